"""Realistic response pairs for the comparator's tests: a small shop API answered by a primary and by a
candidate (and a baseline) that differ in planted ways, with the noise real servers make (timestamps,
trace ids, Date, ETag, Set-Cookie session values, request ids) everywhere.

`Shop(plants).responses(request)` answers like one server; two Shops with the same seed answer the
same requests with the same data, each with its own noise.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import uuid
from dataclasses import dataclass

from spoa_mirror.compare import Response

ENDPOINTS = ("users", "orders", "items", "search", "health", "page", "avatar")
PLANTS = ("status", "price", "slow")  # status: /orders 500; price: /items items[3].price; slow: /search


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    seed: int


def requests(count: int, seed: int = 7) -> list[Request]:
    """`count` varied requests over every endpoint: ids, UUIDs, query strings, HEAD and POST."""
    rnd = random.Random(seed)
    out = []
    for index in range(count):
        endpoint = ENDPOINTS[index % len(ENDPOINTS)]
        ident = rnd.randint(1, 10**6)
        if endpoint == "users":
            path = f"/api/users/{ident}?fields=name,email"
        elif endpoint == "orders":
            path = f"/api/orders/{uuid.UUID(int=rnd.getrandbits(128), version=4)}"
        elif endpoint == "items":
            path = f"/api/items/{ident}"
        elif endpoint == "search":
            path = f"/api/search?q=term{ident % 50}"
        elif endpoint == "page":
            path = f"/shop/p/{ident % 300}"
        elif endpoint == "avatar":
            path = f"/static/avatars/{ident:08x}{ident % 10}.png"
        else:
            path = "/health"
        method = (
            "POST" if endpoint == "search" and index % 3 == 0 else "HEAD" if endpoint == "health" else "GET"
        )
        out.append(Request(method, path, rnd.getrandbits(32)))
    return out


class Shop:
    """One server's answers. `plants`: the planted differences this server has (PLANTS)."""

    def __init__(self, name: str, plants: tuple[str, ...] = (), noise_seed: int = 0) -> None:
        self.name = name
        self.plants = plants
        self.noise = random.Random(f"{name}-{noise_seed}")

    def respond(self, request: Request) -> Response:
        data = random.Random(request.seed)  # the same data for every server
        clock = request.seed % 86_400 + self.noise.random() * 3
        stamp = f"2024-12-04T{int(clock) // 3600 % 24:02d}:{int(clock) % 3600 // 60:02d}:{clock % 60:06.3f}Z"
        minute, second = self.noise.randint(0, 59), self.noise.randint(0, 59)
        headers = [
            ("Date", f"Wed, 04 Dec 2024 10:{minute:02d}:{second:02d} GMT"),
            ("Server", f"{self.name}/1.{self.noise.randint(0, 9)}"),
            ("X-Request-Id", str(uuid.UUID(int=self.noise.getrandbits(128), version=4))),
            ("Cache-Control", "no-store"),
        ]
        latency = 0.004 + data.random() * 0.004 + self.noise.random() * 0.001
        parts = request.path.partition("?")[0].split("/")
        endpoint = (
            parts[2] if parts[1] == "api" else {"shop": "page", "static": "avatar"}.get(parts[1], parts[1])
        )
        status = 200
        if endpoint == "users":
            body = {
                "id": data.randint(1, 10**6),
                "name": f"user-{data.randint(1, 999)}",
                "email": f"person{data.randint(1, 999)}@example.com",
                "token": f"tok_{data.getrandbits(64):x}",
                "roles": ["reader", "writer"][: data.randint(1, 2)],
                "fetched_at": stamp,
            }
            headers.append(("Set-Cookie", f"session={self.noise.getrandbits(64):x}; Path=/; HttpOnly"))
        elif endpoint == "orders":
            body = {
                "order": {
                    "id": data.randint(1, 10**9),
                    "total": round(data.random() * 100, 2),
                    "currency": "EUR",
                },
                "trace_id": f"{self.noise.getrandbits(128):032x}",
                "served_at": stamp,
            }
            if "status" in self.plants and data.random() < 0.5:
                status, body = 500, {"error": "internal", "trace_id": body["trace_id"]}
        elif endpoint == "items":
            items = [
                {"sku": f"SKU-{data.randint(100, 999)}", "price": round(data.random() * 50, 2)}
                for _ in range(6)
            ]
            if "price" in self.plants:
                items[3]["price"] = round(items[3]["price"] * 1.1 + 1, 2)
            body = {"items": items, "count": len(items), "generated_at": stamp}
        elif endpoint == "search":
            body = {
                "hits": [f"doc-{data.randint(1, 9999)}" for _ in range(data.randint(0, 8))],
                "took_at": stamp,
            }
            if "slow" in self.plants:
                latency *= 4
        elif endpoint == "health":
            return self._response(204, headers, b"", latency)
        elif endpoint == "page":
            html = "\n".join(
                [
                    "<!doctype html>",
                    f"<title>Product {data.randint(1, 300)}</title>",
                    f"<p>Price: {round(data.random() * 90, 2)} EUR</p>",
                    f"<footer>rendered {stamp} by node {self.noise.getrandbits(64):016x}</footer>",
                ]
            )
            headers += [("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")]
            headers.append(("ETag", f'"{self.noise.getrandbits(40):x}"'))
            return self._response(200, headers, gzip.compress(html.encode(), mtime=0), latency)
        else:  # avatar: the same bytes everywhere
            png = b"\x89PNG\r\n\x1a\n" + hashlib.sha256(request.path.encode()).digest() * 8
            headers.append(("Content-Type", "image/png"))
            return self._response(200, headers, png, latency)
        headers.append(("Content-Type", "application/json"))
        return self._response(status, headers, json.dumps(body).encode(), latency)

    @staticmethod
    def _response(status: int, headers: list[tuple[str, str]], body: bytes, latency: float) -> Response:
        return Response(status, tuple(headers), body, len(body), None, latency)
