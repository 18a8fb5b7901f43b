"""`lessserve chat`: a terminal multi-turn chat, in process or against a server (--url)."""

from __future__ import annotations

import sys

from lessserve.cli.flags import CliError, add_engine_flags, engine_config


def register(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat in the terminal")
    p.add_argument("--url", default=None, help="talk to a running `lessserve serve` instead")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    add_engine_flags(p)
    p.set_defaults(func=run)


def _lines():
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise CliError("--max-new-tokens", "must be >= 1")
    if args.url:
        from lessserve.cli.chat_remote import chat_remote

        return chat_remote(args, _lines())
    from lessserve.cache_store.config import StoreConfig
    from lessserve.workers.engine import Engine
    from lessserve.workers.local_sessions import LocalSessions

    engine = Engine(engine_config(args, max_slots=2))  # the conversation, and its system prompt's copy
    keep = StoreConfig(device_idle_s=None, host_idle_s=None)  # one conversation: it stays in its slot
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with LocalSessions(engine, keep) as ss:  # the worker's store and scheduler, in process
        for line in _lines():
            messages.append({"role": "user", "content": line})
            sys.stdout.write("bot> ")
            for piece in ss.turn("chat", messages, args.max_new_tokens, args.temperature):
                sys.stdout.write(piece)
                sys.stdout.flush()
            session = ss.sessions["chat"]
            messages = list(session.transcript.messages)
            s = session.stats()
            print(f"\n[cached_tokens={s['cached_tokens']} tokens_seen={s['tokens_seen']} "
                  f"cache_bytes={s['cache_bytes']} prefilled={session.last_prefill}]")
    return 0
