#!/usr/bin/env python3
"""A device on paho-mqtt, as a real one would talk to devicehub.

It connects with a last will (`offline`, retained, on its status topic),
subscribes to its command topic, then publishes `online` (retained). Each
command envelope it receives is printed to stdout as one JSON line
{"event": "command", "envelope": {...}}, and answered on its replies topic
as --reply says: `ok`, `error`, or `none` (no answer). A command whose
`expires_at` has passed is dropped (printed as "expired"), and a command
id seen before is answered again without being carried out twice
(printed as "duplicate"): delivery is at least once.

It also subscribes to its desired state topic: each document
{"version", "desired", "delta"} is printed as {"event": "desired",
"document": {...}}; with --apply-desired, a document newer than the last one
applied has its delta applied and reported, as a merge patch, on the
reported state topic.

    pip install paho-mqtt
    python3 paho_device.py --port 1883 --device-id pump-7

The integration tests run it as the device under test; kill it (SIGKILL)
and the broker publishes its last will.
"""

import argparse
import datetime
import json
import sys
import time

import paho.mqtt.client as mqtt


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--reply", choices=["ok", "error", "none"], default="ok")
    parser.add_argument("--reply-delay-ms", type=int, default=0)
    parser.add_argument("--username")
    parser.add_argument("--password-file")
    parser.add_argument("--apply-desired", action="store_true")
    args = parser.parse_args()

    device = args.device_id
    status_topic = f"devices/{device}/status"
    commands_topic = f"devices/{device}/commands"
    replies_topic = f"devices/{device}/replies"
    desired_topic = f"devices/{device}/state/desired"
    reported_topic = f"devices/{device}/state/reported"
    seen = set()
    applied = {"version": 0}

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{device}", clean_session=True)
    if args.username:
        password = None
        if args.password_file:
            with open(args.password_file) as f:
                password = f.read().strip()
        client.username_pw_set(args.username, password)
    client.will_set(status_topic, "offline", qos=1, retain=True)

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe([(commands_topic, 1), (desired_topic, 1)])

    online = {}

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        # Not waited for here: this runs on the network loop.
        online["mid"] = client.publish(status_topic, "online", qos=1, retain=True).mid

    def on_publish(client, userdata, mid, reason_code, properties):
        if online.get("mid") == mid:
            emit("ready")

    def on_desired(message):
        document = json.loads(message.payload)
        emit("desired", document=document, retained=bool(message.retain))
        if not args.apply_desired or document["version"] <= applied["version"]:
            return
        applied["version"] = document["version"]
        if document["delta"]:
            client.publish(reported_topic, json.dumps(document["delta"]), qos=1)

    def on_message(client, userdata, message):
        if message.topic == desired_topic:
            on_desired(message)
            return
        try:
            envelope = json.loads(message.payload)
        except ValueError:
            emit("not_json", payload=message.payload.decode("utf-8", "replace"))
            return
        command_id = envelope.get("id")
        expires_at = envelope.get("expires_at")
        if expires_at:
            deadline = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            if deadline < datetime.datetime.now(datetime.timezone.utc):
                emit("expired", envelope=envelope)
                return
        duplicate = command_id in seen
        seen.add(command_id)
        emit("duplicate" if duplicate else "command", envelope=envelope)
        if args.reply == "none":
            return
        if args.reply_delay_ms:
            time.sleep(args.reply_delay_ms / 1000)
        reply = {"id": command_id, "status": args.reply}
        if args.reply == "ok":
            reply["result"] = {"done": envelope.get("command")}
        else:
            reply["message"] = "refused by the test device"
        client.publish(replies_topic, json.dumps(reply), qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=5)
    client.loop_forever()


if __name__ == "__main__":
    sys.exit(main())
