#!/usr/bin/env python3
"""A small devicehub client in Python, built on stubs generated from the proto.

Generate the stubs first (from the repository root):

    mkdir -p examples/python/gen
    python3 -m grpc_tools.protoc -I proto \
        --python_out=examples/python/gen --grpc_python_out=examples/python/gen \
        proto/devicehub/v1/devicehub.proto

Then:

    python3 examples/python/devicehub_client.py list  --device-id sim-1
    python3 examples/python/devicehub_client.py watch --device-id sim-1 --count 5
    python3 examples/python/devicehub_client.py send  --device-id sim-1 \
        --command TURN_ON_FAN --params '{"speed": 3}'
    printf '%s\n' '{"device_id": "sim-1", "command": "PING"}' \
                   '{"device_id": "sim-2", "command": "TURN_OFF_FAN"}' |
        python3 examples/python/devicehub_client.py send-many

With TLS and a token (the service started with --tls-cert and --auth-jwt-key):

    DEVICEHUB_TOKEN="$(cat token.jwt)" python3 examples/python/devicehub_client.py \
        --target localhost:50051 --ca ca.crt list

--token (or DEVICEHUB_TOKEN) is sent as `authorization: Bearer <token>`;
without --ca it is only sent to a loopback target.

Every reading or response is printed as one JSON line (protobuf's JSON
mapping). A gRPC error is printed to stderr with its status code, and the exit
status is 1. The stubs directory defaults to examples/python/gen; set
DEVICEHUB_PY_STUBS to use another one.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.environ.get("DEVICEHUB_PY_STUBS", os.path.join(os.path.dirname(__file__), "gen")))

import grpc  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402

from devicehub.v1 import devicehub_pb2, devicehub_pb2_grpc  # noqa: E402


def emit(message_or_dict):
    if not isinstance(message_or_dict, dict):
        message_or_dict = json_format.MessageToDict(message_or_dict)
    print(json.dumps(message_or_dict, sort_keys=True), flush=True)


def list_readings(stub, args):
    """Pages through every matching reading, oldest first."""
    token = ""
    while True:
        page = stub.ListReadings(
            devicehub_pb2.ListReadingsRequest(
                device_id=args.device_id,
                topic_filter=args.topic_filter,
                page_size=args.page_size,
                page_token=token,
                oldest_first=True,
            ),
            timeout=args.timeout,
        )
        for reading in page.readings:
            emit(reading)
        token = page.next_page_token
        if not token:
            return


def list_devices(stub, args):
    """Pages through every known device, in id order."""
    token = ""
    while True:
        page = stub.ListDevices(
            devicehub_pb2.ListDevicesRequest(
                device_id_prefix=args.prefix, page_size=args.page_size, page_token=token
            ),
            timeout=args.timeout,
        )
        for device in page.devices:
            emit(device)
        token = page.next_page_token
        if not token:
            return


def watch_readings(stub, args):
    """Streams readings; stops after --count of them (0: never)."""
    call = stub.WatchReadings(
        devicehub_pb2.WatchReadingsRequest(device_id=args.device_id, topic_filter=args.topic_filter)
    )
    # The server subscribes before it sends headers: once they are here, no
    # reading published from now on is missed.
    call.initial_metadata()
    emit({"watching": True})
    seen = 0
    for response in call:
        if response.WhichOneof("event") == "reading":
            emit(response.reading)
            seen += 1
            if args.count and seen >= args.count:
                call.cancel()
                return
        # Other event kinds may be added to the API later; skip them.


def send_command(stub, args):
    request = devicehub_pb2.SendCommandRequest(device_id=args.device_id, command=args.command, qos=args.qos)
    if args.params is not None:
        params = struct_pb2.Struct()
        params.update(json.loads(args.params))
        request.params.CopyFrom(params)
    emit(stub.SendCommand(request, timeout=args.timeout))


def send_many(stub, args):
    """Sends the commands read from stdin (one SendCommandRequest as JSON per
    line) over one StreamCommands stream, and prints each outcome as it comes:
    the request's line number as request_id, its status code name, and the
    response or the error message."""

    def requests():
        for number, line in enumerate(sys.stdin, start=1):
            if line.strip():
                command = json_format.Parse(line, devicehub_pb2.SendCommandRequest())
                yield devicehub_pb2.StreamCommandsRequest(request_id=number, command=command)

    names = {code.value[0]: code.name for code in grpc.StatusCode}
    for response in stub.StreamCommands(requests()):
        code = names.get(response.status_code, str(response.status_code))
        outcome = {"requestId": response.request_id, "code": code}
        if response.status_code == 0:
            outcome["response"] = json_format.MessageToDict(response.response)
        else:
            outcome["message"] = response.status_message
        emit(outcome)


def open_channel(args):
    """A channel to --target: TLS with --ca, the token as call credentials."""
    if args.ca:
        with open(args.ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    elif args.token:
        # gRPC sends call credentials only over a protected channel; a local
        # connection counts as one.
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return grpc.insecure_channel(args.target)
    if args.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(args.token)
        )
    return grpc.secure_channel(args.target, credentials)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=os.environ.get("DEVICEHUB_GRPC_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of unary calls, seconds")
    parser.add_argument("--ca", help="PEM file of the CA that signs the service's certificate: use TLS")
    parser.add_argument("--token", default=os.environ.get("DEVICEHUB_TOKEN"), help="JWT to send (or DEVICEHUB_TOKEN)")
    sub = parser.add_subparsers(dest="action", required=True)

    for name in ("list", "watch"):
        p = sub.add_parser(name)
        p.add_argument("--device-id", default="")
        p.add_argument("--topic-filter", default="")
    sub.choices["list"].add_argument("--page-size", type=int, default=100)
    sub.choices["watch"].add_argument("--count", type=int, default=0)

    send = sub.add_parser("send")
    send.add_argument("--device-id", required=True)
    send.add_argument("--command", required=True)
    send.add_argument("--params", help="JSON object")
    send.add_argument("--qos", type=int, default=1)

    sub.add_parser("send-many", help="commands from stdin, one JSON SendCommandRequest a line")

    devices = sub.add_parser("devices", help="every known device with its newest reading and status")
    devices.add_argument("--prefix", default="", help="only device ids starting with this")
    devices.add_argument("--page-size", type=int, default=100)

    args = parser.parse_args()
    actions = {
        "list": list_readings,
        "watch": watch_readings,
        "send": send_command,
        "send-many": send_many,
        "devices": list_devices,
    }
    with open_channel(args) as channel:
        stub = devicehub_pb2_grpc.DeviceHubStub(channel)
        try:
            actions[args.action](stub, args)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
