"""Small network tools run inside the bed's namespaces (stdlib sockets only), each bounded in
time and bytes. Each prints one JSON line when ready or done:

    python tests/netbed_probe.py echo ADDR PORT SECONDS     TCP echo, one connection at a time
    python tests/netbed_probe.py sink ADDR PORT SECONDS     read one connection to EOF
    python tests/netbed_probe.py send ADDR PORT NBYTES      send NBYTES, print seconds taken
    python tests/netbed_probe.py talk ADDR PORT TEXT        send TEXT, print the echo
    python tests/netbed_probe.py capture IFACE SECONDS OUT STOPFILE   raw AF_PACKET capture
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

ETH_P_ALL = 0x0003
MAX_CAPTURE = 64 << 20


def _listen(addr: str, port: int, seconds: float) -> socket.socket:
    srv = socket.create_server((addr, port))
    srv.settimeout(seconds)
    print(json.dumps({"ready": port}), flush=True)
    return srv


def echo(addr: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with _listen(addr, port, seconds) as srv:
        while time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                break
            with conn:
                conn.settimeout(5)
                data = conn.recv(65536)
                if data:
                    conn.sendall(data)


def sink(addr: str, port: int, seconds: float) -> None:
    with _listen(addr, port, seconds) as srv:
        conn, _ = srv.accept()
        total = 0
        with conn:
            conn.settimeout(seconds)
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
    print(json.dumps({"received": total}), flush=True)


def send(addr: str, port: int, nbytes: int) -> None:
    block = b"\0" * (1 << 20)
    start = time.perf_counter()
    with socket.create_connection((addr, port), timeout=60) as s:
        left = nbytes
        while left > 0:
            n = s.send(block[: min(left, len(block))])
            left -= n
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has read everything
    print(json.dumps({"seconds": time.perf_counter() - start, "bytes": nbytes}), flush=True)


def talk(addr: str, port: int, text: str) -> None:
    with socket.create_connection((addr, port), timeout=10) as s:
        s.sendall(text.encode())
        print(json.dumps({"reply": s.recv(65536).decode()}), flush=True)


def capture(iface: str, seconds: float, out: str, stopfile: str) -> None:
    """Every frame seen on `iface` until STOPFILE appears or SECONDS pass, appended to OUT as
    they come, each after its length (4 bytes, big-endian); bounded at MAX_CAPTURE bytes."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(0.1)
    deadline = time.monotonic() + seconds
    frames = total = 0
    with open(out, "wb") as f:
        print(json.dumps({"ready": iface}), flush=True)
        while time.monotonic() < deadline and total < MAX_CAPTURE:
            if os.path.exists(stopfile):
                break
            try:
                frame = s.recv(65536)
            except TimeoutError:
                continue
            f.write(len(frame).to_bytes(4, "big") + frame)
            frames += 1
            total += len(frame)
    s.close()
    print(json.dumps({"frames": frames, "bytes": total}), flush=True)


def tcp_payloads(data: bytes) -> dict[int, bytes]:
    """The TCP payload bytes in a capture, by server port (the lower of the two ports)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        frame, pos = data[pos + 4:pos + 4 + n], pos + 4 + n
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        tcp = frame[14 + ihl:14 + total]
        if len(tcp) < 20:
            continue
        ports = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
        payload = tcp[(tcp[12] >> 4) * 4:]
        out[min(ports)] = out.get(min(ports), b"") + payload
    return out


def main(argv: list[str]) -> int:
    op, args = argv[0], argv[1:]
    if op == "echo":
        echo(args[0], int(args[1]), float(args[2]))
    elif op == "sink":
        sink(args[0], int(args[1]), float(args[2]))
    elif op == "send":
        send(args[0], int(args[1]), int(args[2]))
    elif op == "talk":
        talk(args[0], int(args[1]), args[2])
    elif op == "capture":
        capture(args[0], float(args[1]), args[2], args[3])
    else:
        print(f"unknown op {op}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
