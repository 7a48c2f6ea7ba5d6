"""A private three-node Redis Cluster for the tests: three redis-server processes with `--cluster-enabled yes` on free
loopback ports (bus ports chosen free too, with `--cluster-port`), each in its own folder, joined by
`redis-cli --cluster create ... --cluster-replicas 0`. Stopped by pid, never touching any other Redis."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import key_slot

from therouter.redisproc import RedisProcess, free_port


def find_redis_cli() -> str | None:
    return shutil.which("redis-cli") or ("/usr/bin/redis-cli" if Path("/usr/bin/redis-cli").exists() else None)


@dataclass
class RedisClusterProcess:
    base_dir: Path
    size: int = 3
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The gateway's cluster URL, every node a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        cli = find_redis_cli()
        if cli is None:
            raise RuntimeError("redis-cli is not installed: run ./scripts/test.sh (it installs redis-tools)")
        try:
            for i in range(self.size):
                node = RedisProcess(self.base_dir / f"node{i}", appendonly=True, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000"])
                self.nodes.append(node)
                node.start()
            made = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                                   "--cluster-replicas", "0", "--cluster-yes"],
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout[-2000:]} {made.stderr[-2000:]}")
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for n in self.nodes:
                with redis.Redis(port=n.port, socket_timeout=1) as r:
                    info = r.execute_command("CLUSTER INFO")
                    states.append(info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0))
                                  == self.size and int(info.get("cluster_slots_ok", 0)) == 16384)
            if all(states):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in time")

    def node_for(self, key: str) -> RedisProcess:
        """The node that serves the slot of ``key``."""
        slot = key_slot(key.encode())
        with redis.Redis(port=self.nodes[0].port, socket_timeout=1) as r:
            for start, end, primary, *_ in r.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
