"""Serve's own metrics (`ray_serve_*`: requests, latencies, replica states), read from the Ray metrics agent of
the ingress's node and appended to Kiln's `/metrics`, so one scrape shows both."""

from __future__ import annotations

import httpx

PREFIX = "ray_serve_"
TIMEOUT_S = 2.0


async def serve_metrics() -> str:
    """The `ray_serve_*` families of this node's Ray metrics endpoint; a comment saying why when unreadable."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None or not node.get("MetricsExportPort"):
        return "# Ray Serve metrics: this node exports none\n"
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            text = (await client.get(url)).text
    except httpx.HTTPError as error:
        return f"# Ray Serve metrics: {url} unreadable ({type(error).__name__})\n"
    lines = [line for line in text.splitlines() if line.startswith(PREFIX) or line.startswith(
        (f"# HELP {PREFIX}", f"# TYPE {PREFIX}"))]
    return "\n".join(lines) + "\n" if lines else ""
