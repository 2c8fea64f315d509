"""Target for pairs.py: first byte u = discard what comes; d + 8-byte rate (bytes/s) = send at that pace."""
import socket, threading, struct, time, sys, os
chunk = os.urandom(1 << 20)
def handle(c):
    try:
        m = c.recv(1)
        if m == b'u':
            buf = bytearray(1 << 20)
            while c.recv_into(buf): pass
        elif m == b'd':
            rate = struct.unpack('>Q', c.recv(8))[0]
            start = time.monotonic(); sent = 0
            while True:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0: time.sleep(ahead)
                c.sendall(chunk[: 256 * 1024]); sent += 256 * 1024
    except Exception: pass
    finally: c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 0)); s.listen(64)
print('port', s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
