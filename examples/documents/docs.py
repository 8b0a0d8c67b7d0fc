"""Document processing on upload: a file lands in a bucket, its analysis lands in another,
and that second upload becomes a domain event that a notifier reacts to.

- ``inbox``: text documents (``*.txt``, ``*.md``) are dropped here, by ``eventfn upload inbox
  FILE``, by ``app.buckets["inbox"].put(...)`` or by any program that copies files into
  ``buckets/inbox/``. ``analyse`` counts words and lines and finds the most frequent words.
- ``processed``: ``analyse`` stores its result as ``<key>.json``; storing it publishes the
  upload event (with the handler's ack, like any emit).
- ``announce`` reacts to each result and emits ``DocumentProcessed`` on the event bus, which
  ``notify`` turns into a line of ``notifications.log`` beside the buckets (an e-mail, in a
  real system).

Run it::

    eventfn run examples.documents.docs:app --buckets ./buckets
    eventfn upload inbox ./README.md --buckets ./buckets
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import anyio
import msgspec

import eventfn

app = eventfn.App("documents", retry=eventfn.Retry(attempts=3, backoff=0.2, cap=2.0))

WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


class Analysis(msgspec.Struct, frozen=True):
    """What ``analyse`` learns from a document."""

    source: str
    words: int
    lines: int
    top: list[tuple[str, int]]


class DocumentProcessed(msgspec.Struct, frozen=True):
    """A document's analysis is stored (CloudEvents type ``document.processed``)."""

    source: str
    result: str
    words: int


def analyse_text(name: str, text: str) -> Analysis:
    words = [w.lower() for w in WORD.findall(text)]
    top = Counter(w for w in words if len(w) > 3).most_common(5)
    return Analysis(source=name, words=len(words), lines=text.count("\n") + 1, top=top)


@app.on_upload(bucket="inbox", match=["*.txt", "*.md"], group="analyse")
async def analyse(upload: eventfn.Upload, ctx: eventfn.Context) -> None:
    text = (await upload.read()).decode("utf-8", errors="replace")
    result = analyse_text(upload.key, text)
    ctx.log.info("%s: %d words", upload.key, result.words)
    await app.buckets["processed"].put(
        f"{upload.key}.json", msgspec.json.encode(result), content_type="application/json"
    )


@app.on_upload(bucket="processed", match="*.json", group="announce", emits=[DocumentProcessed])
async def announce(upload: eventfn.Upload, ctx: eventfn.Context) -> None:
    result = msgspec.json.decode(await upload.read(), type=Analysis)
    await ctx.emit(DocumentProcessed(source=result.source, result=upload.key, words=result.words))


@app.on_event(DocumentProcessed, group="notify")
async def notify(event: DocumentProcessed) -> None:
    log = Path(app.buckets.root) / "notifications.log"
    line = json.dumps({"source": event.source, "result": event.result, "words": event.words})
    await anyio.to_thread.run_sync(_append, log, line)


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
