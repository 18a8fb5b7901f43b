"""`lessserve chat --url`: the terminal chat against a running server, streaming over SSE."""

from __future__ import annotations

import json
import os
import sys
import uuid

from lessserve.cli.flags import CliError


def chat_remote(args, lines) -> int:
    import httpx

    base = args.url.rstrip("/")
    headers = {"X-Session-Id": f"cli-{uuid.uuid4().hex[:12]}"}
    if os.environ.get("LESSSERVE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['LESSSERVE_API_KEY']}"
    try:
        model = httpx.get(f"{base}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise CliError("--url", f"no lessserve server at {base}: {e}") from None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for line in lines:
        messages.append({"role": "user", "content": line})
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": args.max_new_tokens,
                "temperature": args.temperature}
        reply = []
        sys.stdout.write("bot> ")
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                print(f"\n[error {r.status_code}: {r.json().get('error', {}).get('message')}]")
                messages.pop()
                continue
            for raw in r.iter_lines():
                if not raw.startswith("data: ") or raw == "data: [DONE]":
                    continue
                delta = json.loads(raw[6:])["choices"]
                piece = delta[0]["delta"].get("content", "") if delta else ""
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        info = httpx.get(f"{base}/v1/sessions/{headers['X-Session-Id']}", headers=headers, timeout=30).json()
        print(f"\n[worker={info.get('worker')} tier={info.get('tier')} cached_tokens={info.get('cached_tokens')} "
              f"tokens_seen={info.get('tokens_seen')} cache_bytes={info.get('cache_bytes')}]")
    return 0
