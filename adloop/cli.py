"""``adloop``: one command-line entry point with a subcommand per process.

Each subcommand lives in the module that owns it; that module exposes
``configure(parser)`` (add flags) and ``run(args) -> int``. Modules are imported
lazily so that, for instance, ``adloop serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("streams.cli_broker", "run the embedded Apache Kafka broker (KRaft, loopback)"),
    "topics": ("streams.cli_topics", "create / list / describe adloop's topics"),
    "produce": ("streams.cli_debug", "produce JSON events from stdin to a topic (debugging)"),
    "consume": ("streams.cli_debug", "print decoded events from a topic (debugging)"),
    "dlq": ("streams.cli_dlq", "list / show / re-drive dead letters"),
    "smoke": ("streams.smoke", "start a broker, create topics, round-trip sample events"),
    "update-keys": ("streams.signing", "create a model-updates signing keyring file, add or "
                    "drop a key (rotation), list its key ids"),
}


def register_optional() -> None:
    """Subcommands whose modules may not exist in every build of the tree."""
    optional = {
        "pretrain": ("learner.pretrain", "offline VSL + MTP pretraining from logged events"),
        "export": ("learner.export", "export a checkpoint to an ONNX snapshot"),
        "evaluate": ("adloop.offpolicy", "offline recall@K / value-NDCG@K of beam search; "
                     "--offline: a snapshot's value on a recorded log (IPS, SNIPS, DR)"),
        "join": ("streams.joiner", "the joiner: impressions ⋈ clicks ⋈ conversions → feedback"),
        "stats": ("streams.stats", "windowed ad/advertiser/industry stats of feedback → ad-stats "
                  "(faust-streaming, at-least-once)"),
        "learn": ("learner.online", "the continuous RSPO learner"),
        "serve": ("server.app", "the serving worker (HTTP API, ONNX Runtime)"),
        "replay": ("traffic.replay", "replay simulated or recorded traffic"),
        "import": ("adloop.importer", "a recorded log to a snapshot: offline join, "
                   "tokenizer, context features from the data, pretrain, export"),
        "demo": ("adloop.demo", "the whole loop on the embedded stack, with a report"),
    }
    for name, (module, help_text) in optional.items():
        if importlib.util.find_spec(module) is not None:
            COMMANDS.setdefault(name, (module, help_text))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported and configured."""
    register_optional()
    parser = argparse.ArgumentParser(prog="adloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        mod = importlib.import_module(module)
        getattr(mod, f"configure_{name}", getattr(mod, "configure", lambda _p: None))(p)
        p.set_defaults(_run=getattr(mod, f"run_{name}", None) or mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from streams.logs import configure_logging

    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    from importlib.metadata import PackageNotFoundError, version

    from streams.metrics import BUILD_INFO

    try:
        build = version("adloop")
    except PackageNotFoundError:
        build = "dev"
    BUILD_INFO.labels(build, args.command).set(1)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
