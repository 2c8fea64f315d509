"""Client for pairs.py: client.py PORT u|d RATE SECONDS; prints the bytes moved and the seconds taken."""
import socket, struct, time, sys, os
port, mode, rate, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection(('127.0.0.1', port))
chunk = os.urandom(256 * 1024)
if mode == 'u':
    c.sendall(b'u'); start = time.monotonic(); sent = 0
    while time.monotonic() - start < secs:
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0: time.sleep(ahead)
        c.sendall(chunk); sent += len(chunk)
    print(sent, time.monotonic() - start)
else:
    c.sendall(b'd' + struct.pack('>Q', int(rate))); buf = bytearray(1 << 20); got = 0; start = time.monotonic()
    while time.monotonic() - start < secs:
        n = c.recv_into(buf)
        if not n: break
        got += n
    print(got, time.monotonic() - start)
c.close()
