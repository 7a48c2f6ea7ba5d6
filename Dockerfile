# TheRouter gateway: slim, non-root, with a healthcheck.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 THEROUTER_CONFIG=/app/config/therouter.yaml THEROUTER_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 therouter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY config ./config
RUN mkdir -p /app/.therouter && chown therouter /app/.therouter
USER therouter
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"
CMD ["therouter", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
