# TheRouter gateway: slim, non-root, with a healthcheck that follows the configured port.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 THEROUTER_CONFIG=/app/config/therouter.yaml \
    THEROUTER_HOST=0.0.0.0 THEROUTER_PORT=8080
RUN useradd --create-home --uid 10001 therouter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY config ./config
RUN mkdir -p /app/.therouter && chown therouter /app/.therouter
USER therouter
EXPOSE 8080
# `therouter healthcheck` reads the same config as `serve` (server.port = ${THEROUTER_PORT}) and GETs /health
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["therouter", "healthcheck"]
CMD ["therouter", "serve", "--workers", "2"]
