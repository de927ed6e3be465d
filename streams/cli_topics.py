"""``adloop topics create|list``: adloop's topics, created idempotently."""

from __future__ import annotations

import argparse
import os

from kafka.admin import KafkaAdminClient

from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import TOPICS, Topics, create_topics


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "list", "describe"], nargs="?",
                        default="list")
    parser.add_argument("--replication-factor", type=int,
                        default=int(os.environ.get("ADLOOP_REPLICATION_FACTOR", "1")),
                        help="replicas per partition (env ADLOOP_REPLICATION_FACTOR; default 1)")
    add_settings_arguments(parser, KafkaSettings)


def run(args: argparse.Namespace) -> int:
    kafka = settings_from_args(KafkaSettings, args)
    if args.action == "create":
        created = create_topics(kafka.bootstrap_servers, kafka.topic_prefix,
                                args.replication_factor, kafka.security_config())
        for name, what in created.items():
            print(f"{name:40s} {what}")
        return 0
    if args.action == "describe":
        for name, spec in TOPICS.items():
            print(f"{Topics(kafka.topic_prefix).name(name):30s} {spec.record.__name__:12s} "
                  f"partitions={spec.partitions} key={spec.key!r} {spec.configs}")
        return 0
    admin = KafkaAdminClient(**kafka.client_config())
    try:
        for name in sorted(admin.list_topics()):
            print(name)
    finally:
        admin.close()
    return 0
