#!/usr/bin/env python3
"""Tiny SMTP sink for TollGuard's integration tests.

Accepts every message on HOST:PORT (no auth, no TLS) and stores it as one
``.eml`` file in MAILDIR.  Files are written under a temporary name and then
renamed, so a reader that globs ``*.eml`` never sees a half-written message.

Two headers are prepended to the stored message so tests can check the SMTP
envelope as well as the headers:

    X-Envelope-From: <MAIL FROM address>
    X-Envelope-To: <RCPT TO address>, <RCPT TO address>, ...

File names sort by arrival: ``<unix-ns>-<seq>.eml``.

Started and stopped by deploy/local/services.sh; needs the ``aiosmtpd``
package (installed by that script).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time

from aiosmtpd.smtp import SMTP, Envelope, Session

_seq = itertools.count(1)


class MaildirHandler:
    def __init__(self, maildir: str) -> None:
        self.maildir = maildir

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if isinstance(content, str):  # only when decode_data=True; kept for safety
            content = content.encode("utf-8", "surrogateescape")
        mail_from = envelope.mail_from or ""
        rcpts = ", ".join(envelope.rcpt_tos)
        prefix = f"X-Envelope-From: {mail_from}\r\nX-Envelope-To: {rcpts}\r\n".encode(
            "utf-8", "replace"
        )
        name = f"{time.time_ns()}-{next(_seq):06d}"
        tmp = os.path.join(self.maildir, f".{name}.tmp")
        final = os.path.join(self.maildir, f"{name}.eml")
        with open(tmp, "wb") as fh:
            fh.write(prefix)
            fh.write(content)
        os.replace(tmp, final)
        print(
            f"stored {final} from={mail_from!r} to={envelope.rcpt_tos!r} bytes={len(content)}",
            flush=True,
        )
        return "250 Message accepted for delivery"


async def serve(host: str, port: int, maildir: str) -> None:
    handler = MaildirHandler(maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="tollguard-smtp-sink",  # avoids a slow getfqdn() lookup
            enable_SMTPUTF8=True,
            data_size_limit=64 * 1024 * 1024,
        ),
        host=host,
        port=port,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"smtp sink listening on {host}:{port}, maildir {maildir}", flush=True)
    async with server:
        await stop.wait()
    print("smtp sink stopped", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--maildir", required=True)
    args = ap.parse_args()
    os.makedirs(args.maildir, exist_ok=True)
    asyncio.run(serve(args.host, args.port, args.maildir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
