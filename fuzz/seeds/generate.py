#!/usr/bin/env python3
"""Writes the committed seed corpus: fuzz/seeds/<target>/<name>.

Run from anywhere: python3 fuzz/seeds/generate.py. Seeds are small, hand-
picked examples of each input (valid, and near-misses that reach each
error branch); libFuzzer grows its own corpus in fuzz/corpus/ from them.
"""
import base64
import hashlib
import hmac
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "c2VjcmV0LWtleS1ieXRlcw=="
SIG = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%3D"
# The secret fuzz_targets/stream_token.rs and rest_headers.rs verify with.
STREAM_TOKEN_SECRET = b"devstreams-fuzz-secret"
# 2100-01-01: seed tokens stay valid for as long as anyone runs these.
FAR_FUTURE = 4102444800


def seed(target, name, content):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    with open(os.path.join(HERE, target, name), "wb") as file:
        file.write(content)


def stream_token(stream_id, device_id, side, exp):
    """A JWT exactly as StreamTokenKey::issue writes it (same field order)."""
    def part(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header = part(b'{"typ":"JWT","alg":"HS256"}')
    claims = json.dumps({"stream_id": stream_id, "device_id": device_id, "side": side, "exp": exp}, separators=(",", ":"))
    signing_input = f"{header}.{part(claims.encode())}"
    signature = hmac.new(STREAM_TOKEN_SECRET, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


# MQTT 3.1.1 encoding, just enough for the packets a device sends.
def remaining_length(length):
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def mqtt_string(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def packet(first_byte, body):
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect(client_id, username, password, keep_alive=60):
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    body = mqtt_string("MQTT") + bytes([4, flags]) + struct.pack(">H", keep_alive)
    body += mqtt_string(client_id) + mqtt_string(username) + mqtt_string(password)
    return packet(0x10, body)


def subscribe(packet_id, filters):
    body = struct.pack(">H", packet_id) + b"".join(mqtt_string(f) + bytes([qos]) for f, qos in filters)
    return packet(0x82, body)


def unsubscribe(packet_id, filters):
    return packet(0xA2, struct.pack(">H", packet_id) + b"".join(mqtt_string(f) for f in filters))


def publish(topic, payload=b"", qos=0, packet_id=1):
    body = mqtt_string(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


PINGREQ = bytes([0xC0, 0x00])
DISCONNECT = bytes([0xE0, 0x00])


def main():
    seed("connection_string", "device", f"HostName=relay.example.com:8443;DeviceId=MyDevice;SharedAccessKey={KEY}")
    seed("connection_string", "service", f"HostName=relay.example.com;SharedAccessKeyName=service;SharedAccessKey={KEY}")
    seed("connection_string", "module_spaces_unknown_key",
         f" HostName = [::1]:8443 ; DeviceId=d;ModuleId=m;GatewayHostName=gw;SharedAccessKey={KEY}; ")
    seed("connection_string", "empty_device_id", "HostName=h;DeviceId=;SharedAccessKey=AA==")
    seed("connection_string", "bad_base64", "HostName=h;DeviceId=a;SharedAccessKey=!!")
    seed("connection_string", "missing_equals", "garbage-without-equals-and-longer-than-24-characters")

    seed("sas_token", "device", f"SharedAccessSignature sr=relay.example.com%2Fdevices%2FMyDevice&sig={SIG}&se=1767225600")
    seed("sas_token", "service", f"SharedAccessSignature sr=relay.example.com&sig={SIG}&se=1767225600&skn=service")
    seed("sas_token", "module_lowercase_empty_skn", "SharedAccessSignature sr=h%2fdevices%2fd%2fmodules%2fm&sig=AA%3D%3D&se=1&skn=")
    seed("sas_token", "duplicate_field", "SharedAccessSignature sr=a&sr=b&se=1&sig=AA==")
    seed("sas_token", "odd_values", "SharedAccessSignature se=+18446744073709551615&sig=&sr=%FF")

    seed("stream_token", "device", stream_token("0123456789abcdef0123456789abcdef", "MyDevice", "device", FAR_FUTURE))
    seed("stream_token", "service", stream_token("0123456789abcdef0123456789abcdef", "MyDevice", "service", FAR_FUTURE))
    seed("stream_token", "expired", stream_token("0123", "d", "device", 1))
    seed("stream_token", "alg_none", "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJleHAiOjQxMDI0NDQ4MDB9.")
    seed("stream_token", "not_a_jwt", "not.a.jwt")

    request_topic = ("$iothub/streams/POST/TestStream/?$rid=17"
                     "&$url=wss%3A%2F%2Frelay.example.com%3A8443%2Fbridges%2Fhub%2FMyDevice%2F0123abcd"
                     f"&$auth={stream_token('0123abcd', 'MyDevice', 'device', FAR_FUTURE)}"
                     "&$target=localhost%3A22&$halfclose=1")
    seed("topics", "request", request_topic)
    seed("topics", "response_accepted", "$iothub/streams/res/200/?$rid=5")
    seed("topics", "response_rejected", "$iothub/streams/res/400/?$rid=9&$other=x&$halfclose=1")
    seed("topics", "request_incomplete", "$iothub/streams/POST/x/?$rid=1")
    seed("topics", "stream_name", "TestStream")

    seed("rest_route", "create", "/twins/MyDevice/streams/TestStream")
    seed("rest_route", "create_module_query", "/twins/My%20Device%2B1/modules/m+1/streams/ssh?api-version=2021-04-12")
    seed("rest_route", "bridge", "/bridges/hub/MyDevice/0123456789abcdef0123456789abcdef")
    seed("rest_route", "control", "/$iothub/websocket")
    seed("rest_route", "health", "//health")
    seed("rest_route", "bad_utf8", "/twins/%FF/streams/s")

    seed("rest_headers", "create",
         "host: relay.example.com:8443\n"
         f"authorization: SharedAccessSignature sr=relay.example.com&sig={SIG}&se=1767225600&skn=service\n"
         "iothub-streaming-connect-timeout-in-seconds: 30\n"
         "iothub-streaming-response-timeout-in-seconds: 30\n"
         "x-devstreams-target: localhost:22\n"
         "x-devstreams-half-close: True\n")
    seed("rest_headers", "upgrade",
         "connection: keep-alive, Upgrade\nupgrade: websocket\nsec-websocket-version: 13\n"
         "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\nsec-websocket-protocol: mqtt\n"
         f"authorization: Bearer {stream_token('0123', 'MyDevice', 'service', FAR_FUTURE)}\n")
    seed("rest_headers", "bad_timeouts",
         "iothub-streaming-connect-timeout-in-seconds: 0\n"
         "iothub-streaming-response-timeout-in-seconds: 99999999999999999999\n")

    # device_targets: the requested $target, then the exposed targets, one per line.
    seed("device_targets", "port", "22\nlocalhost:22\n127.0.0.1:8080")
    seed("device_targets", "host_port_other_case", "LocalHost:22\nlocalhost:22")
    seed("device_targets", "ipv6_not_exposed", "[::1]:5432\n[::1]:22\nlocalhost:5432")
    seed("device_targets", "malformed", "99999\nlocalhost:22")
    seed("device_targets", "no_request_line", "\n[fe80::1]:22\nlocalhost:22\nLOCALHOST:22")

    # mqtt_packets: a control byte (see the target's doc), chunk sizes, then the stream.
    password = f"SharedAccessSignature sr=relay.example.com%2Fdevices%2FMyDevice&sig={SIG}&se=1767225600"
    session = (connect("MyDevice", "relay.example.com/MyDevice/?api-version=2021-04-12", password)
               + subscribe(1, [("$iothub/streams/POST/#", 0), ("$iothub/streams/res/#", 0), ("$iothub/methods/POST/#", 1)])
               + publish("$iothub/streams/res/200/?$rid=5", qos=1, packet_id=2)
               + publish("$iothub/streams/res/400/?$rid=6")
               + unsubscribe(3, ["$iothub/methods/POST/#"])
               + PINGREQ + DISCONNECT)
    seed("mqtt_packets", "session_one_read", b"\x00" + session)
    seed("mqtt_packets", "session_byte_by_byte", b"\x01\x00" + session)
    seed("mqtt_packets", "session_reads_of_3_and_7", b"\x02\x02\x06" + session)
    seed("mqtt_packets", "module_connect_split", b"\x01\x04"
         + connect("MyDevice/m1", "h/MyDevice/m1/?api-version=2021-04-12", password, keep_alive=0))
    # Under the 256-byte limit: many small packets in one read, then one too large.
    seed("mqtt_packets", "small_limit_many_pings", b"\x08" + PINGREQ * 200)
    seed("mqtt_packets", "small_limit_oversized_publish", b"\x08" + publish("t", b"x" * 300))
    seed("mqtt_packets", "truncated_publish", b"\x00" + publish("$iothub/streams/res/200/?$rid=5")[:-3])
    seed("mqtt_packets", "bad_remaining_length", b"\x00\x30\xff\xff\xff\xff\x01")


if __name__ == "__main__":
    main()
