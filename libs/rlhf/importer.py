"""Offline data import: preference pairs (HH-RLHF layout) and demonstrations, as live events.

    rlhf import preferences hh.jsonl --name hh-helpful
    rlhf import demonstrations demos.jsonl --name support-v1

(`python -m rlhf.importer ...` is the same command.)

Nothing downstream knows about imports: every valid line becomes the events the live system
would have produced, on the real topics, and the running reward and sft stages take them like any
other feedback.

* A preference line `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: A", "rejected": "...: B"}` is
  two GenerationEvents for the same conversation (answers A and B) and one FeedbackEvent ranking
  [A, B]. The reward stage turns it into the pair (A better than B).
* A demonstration line `{"prompt": ..., "response": ...}` (the RLHF_SFT_DATA format) is a
  GenerationEvent for the prompt, with no answer, and a FeedbackEvent correcting it with the
  response. The sft stage turns it into the same demonstration as the file would.

Prompts are tokenised with the policy tokenizer as the generation service does (chat template for
HH conversations; a demonstration's prompt as it is, like RLHF_SFT_DATA), so the ppo stage takes
each imported prompt as one more prompt to roll out, like any prompt that received feedback.

Imported events are marked: tenant `import:<name>` on feedback, `finish_reason` "import" and
policy version 0 on generations, and ids `import:<name>:<digest>:...`. Ids are a digest of the
dataset name and the line's content, so importing a file again publishes the same ids and the
trainers' join drops the repeated feedback. They are not signed generation ids (`rlhf.ids`:
those carry a key id and the tenant that asked), so no app can rate an imported generation
through the feedback service (it refuses them as malformed); a pair's three events are keyed by
the ranking's id, which is what `rlhf.ids.partition_key` gives for such ids. A line counts as
imported only once the broker has acknowledged all of its events; a broker failure stops the
import (running it again is safe).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

from rlhf import bus
from rlhf.bus import BusUnavailable, Publisher
from rlhf.config import CommonConfig, load_config
from rlhf.ids import feedback_event_id
from rlhf.limits import MAX_MESSAGES, FeedbackLimits, PromptLimits
from rlhf.training.sft_config import SFTConfig
from rlhf.v1 import common_pb2, events_pb2

KINDS = ("preferences", "demonstrations")
FINISH_REASON = "import"  # in place of "eos" / "length" / "stop": no policy sampled the answer
TENANT_PREFIX = "import:"
EXIT_OK = 0
EXIT_NOTHING_IMPORTED = 1
EXIT_USAGE = 2
EXIT_UNCONFIRMED = 3  # the broker stopped confirming part way: run the same command again
# Lines are read with a bound so one runaway line cannot exhaust memory; the text limits below
# are what decides, this only has to be above any line they allow (JSON may escape every char).
MAX_LINE_BYTES = 1 << 20
IMPORT_DELIVERY_TIMEOUT_MS = 30_000
# Lines whose events may be unacknowledged at once: enough to keep batches full, few enough that
# their events (a few KB a line) stay well inside the producer's 32 MB buffer.
WINDOW_LINES = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LineError(ValueError):
    """Why one line cannot be imported (the message is shown to the user)."""


@dataclass(frozen=True)
class Limits:
    """The bounds the live services apply, so an import carries nothing they would refuse:
    prompts as the generation service accepts them, answers and corrections as long as the
    feedback service accepts a correction, demonstrations as long as the sft stage trains on."""

    max_messages: int = MAX_MESSAGES
    max_prompt_chars: int = PromptLimits.max_prompt_chars
    max_prompt_tokens: int = PromptLimits.max_prompt_tokens
    max_text_chars: int = FeedbackLimits.max_text_chars
    sft_max_tokens: int = SFTConfig.max_tokens

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The limits the services run with here: the same settings, from the same variables."""
        prompts = load_config(PromptLimits, environ)
        feedback = load_config(FeedbackLimits, environ)
        return cls(
            max_prompt_chars=prompts.max_prompt_chars,
            max_prompt_tokens=prompts.max_prompt_tokens,
            max_text_chars=feedback.max_text_chars,
            sft_max_tokens=load_config(SFTConfig, environ).max_tokens,
        )


# --------------------------------------------------------------------------------------------
# Parsing and validation: pure functions, one LineError per fault
# --------------------------------------------------------------------------------------------

Turn = tuple[str, str]  # (role, content), roles as in ChatMessage: "user", "assistant"


@dataclass(frozen=True)
class Preference:
    """One HH-RLHF line: the conversation before the answers, and the two answers."""

    turns: tuple[Turn, ...]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class DemonstrationLine:
    prompt: str
    response: str


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"not UTF-8 (byte {exc.start})") from exc


def _json_object(line: str) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(item, dict):
        raise LineError(f"expected a JSON object, got {type(item).__name__}")
    return item


# Fields that tell a line of the other kind: a likely mix-up of the command's kind argument.
_OTHER_KIND = {"prompt": ("chosen", "preferences"), "chosen": ("prompt", "demonstrations")}


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if value is None:
        other_key, other_kind = _OTHER_KIND.get(key, ("", ""))
        hint = f" (it has {other_key!r}: a line of {other_kind}?)" if other_key in item else ""
        raise LineError(f'"{key}" is missing{hint}')
    if not isinstance(value, str):
        raise LineError(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise LineError(f'"{key}" is empty')
    try:
        value.encode("utf-8")  # protobuf strings must be UTF-8; JSON can escape lone surrogates
    except UnicodeEncodeError as exc:
        raise LineError(f'"{key}" is not valid Unicode (a lone surrogate escape)') from exc
    return value


def parse_hh(transcript: str) -> tuple[tuple[Turn, ...], str]:
    """(the turns before the last answer, the last answer) of a "\\n\\nHuman: ...\\n\\nAssistant:
    ..." transcript. Turn contents are stripped: the spaces around them are layout."""
    pieces = _HH_TURN.split("\n\n" + transcript.lstrip())
    if pieces[0].strip() or len(pieces) < 3:
        raise LineError('expected "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." turns')
    turns = [(_HH_ROLES[pieces[i]], pieces[i + 1].strip()) for i in range(1, len(pieces), 2)]
    if turns[0][0] != "user":
        raise LineError("the conversation must start with a Human turn")
    if turns[-1][0] != "assistant":
        raise LineError("the conversation must end with an Assistant turn")
    for number, (_, content) in enumerate(turns[:-1], start=1):
        if not content:
            raise LineError(f"turn {number} ({pieces[2 * number - 1]}) is empty")
    answer = turns[-1][1]
    if not answer:
        raise LineError("the last Assistant turn is empty")
    return tuple(turns[:-1]), answer


def _hh_side(item: dict[str, Any], key: str) -> tuple[tuple[Turn, ...], str]:
    try:
        return parse_hh(_text(item, key))
    except LineError as exc:
        message = str(exc)
        raise LineError(message if message.startswith(f'"{key}"') else f"{key}: {message}") from exc


def parse_preference(line: str, limits: Limits) -> Preference:
    """A validated HH-RLHF line; raises LineError."""
    item = _json_object(line)
    chosen_turns, chosen = _hh_side(item, "chosen")
    rejected_turns, rejected = _hh_side(item, "rejected")
    if chosen_turns != rejected_turns:
        raise LineError("chosen and rejected differ before the last Assistant turn")
    if chosen == rejected:
        raise LineError("chosen and rejected are the same answer")
    preference = Preference(chosen_turns, chosen, rejected)
    _check_prompt_size(preference.turns, limits)
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        _check_text_size(key, answer, limits)
    return preference


def parse_demonstration(line: str, limits: Limits) -> DemonstrationLine:
    """A validated {"prompt", "response"} line; raises LineError."""
    item = _json_object(line)
    demo = DemonstrationLine(_text(item, "prompt"), _text(item, "response"))
    if len(demo.prompt) > limits.max_prompt_chars:
        raise LineError(f"prompt exceeds {limits.max_prompt_chars} characters")
    _check_text_size("response", demo.response, limits)
    return demo


def _check_prompt_size(turns: Sequence[Turn], limits: Limits) -> None:
    if len(turns) > limits.max_messages:
        raise LineError(f"{len(turns)} turns before the answer; at most {limits.max_messages}")
    if sum(len(content) for _, content in turns) > limits.max_prompt_chars:
        raise LineError(f"the conversation exceeds {limits.max_prompt_chars} characters")


def _check_text_size(key: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise LineError(f"{key} exceeds {limits.max_text_chars} characters")


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class PromptEncoder(Protocol):
    """What the generation service does to a request's prompt (the policy tokenizer)."""

    def chat(self, messages: Sequence[common_pb2.ChatMessage]) -> str:
        """The prompt text of a chat: its template applied, ready for the answer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens added."""


# rlhf.models and rlhf.training.sft import torch and transformers (3 s): they are imported where
# used, so that `rlhf` builds its parser, which includes `rlhf import`, without them.


class TokenizerPrompts:
    """A PromptEncoder from a Hugging Face tokenizer, as `services.generation.core` renders."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def chat(self, messages: Sequence[common_pb2.ChatMessage]) -> str:
        from rlhf.models import chat_text

        return chat_text(
            self._tokenizer, [{"role": m.role, "content": m.content} for m in messages]
        )

    def encode(self, text: str) -> list[int]:
        from rlhf.models import encode_text

        return encode_text(self._tokenizer, text)


@dataclass(frozen=True)
class Outgoing:
    """One event to publish, with its record key."""

    topic: str
    key: str
    message: Message


def check_name(name: str) -> str:
    """A dataset name usable in tenants and ids; raises ValueError."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"dataset name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def line_digest(kind: str, name: str, fields: Sequence[str]) -> str:
    """The line's identity: its content, not its position, so a reordered or re-serialised file
    gives the same ids. Length-prefixed, so no two field lists hash the same material."""
    digest = hashlib.sha256()
    for part in (kind, name, *fields):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:32]


def _now() -> Timestamp:
    nanoseconds = time.time_ns()
    return Timestamp(seconds=nanoseconds // 1_000_000_000, nanos=nanoseconds % 1_000_000_000)


def _generation(
    generation_id: str, prompt: str, prompt_ids: list[int], response: str, **fields: Any
) -> events_pb2.GenerationEvent:
    return events_pb2.GenerationEvent(
        generation_id=generation_id,
        prompt=prompt,
        prompt_token_ids=prompt_ids,
        response=response,
        policy_version=0,
        finish_reason=FINISH_REASON,
        created_at=_now(),
        **fields,
    )


def _feedback(name: str, digest: str, feedback: events_pb2.Feedback) -> events_pb2.FeedbackEvent:
    """Identified like a submission to the feedback service: the tenant and an idempotency key
    (the line digest) give the event id, so a repeated import repeats it."""
    tenant = TENANT_PREFIX + name
    feedback.idempotency_key = digest
    return events_pb2.FeedbackEvent(
        event_id=feedback_event_id(tenant, digest),
        tenant=tenant,
        feedback=feedback,
        policy_version=0,
        received_at=_now(),
    )


def preference_events(
    preference: Preference, name: str, prompts: PromptEncoder, limits: Limits
) -> list[Outgoing]:
    """Rejected answer, chosen answer, then the ranking [chosen, rejected]; raises LineError.

    All three are keyed by the chosen id (the generation the ranking is about, like a live
    ranking): one partition, in this order, so whichever consumer joins the ranking to the
    chosen generation has already seen the rejected one, which the ranking pair needs.
    """
    fields = [part for turn in preference.turns for part in turn]
    digest = line_digest("preference", name, [*fields, preference.chosen, preference.rejected])
    messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in preference.turns]
    prompt = prompts.chat(messages)
    prompt_ids = prompts.encode(prompt)
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise LineError(f"prompt has {len(prompt_ids)} tokens; at most {limits.max_prompt_tokens}")
    chosen_id = f"{TENANT_PREFIX}{name}:{digest}:chosen"
    rejected_id = f"{TENANT_PREFIX}{name}:{digest}:rejected"
    ranking = events_pb2.Ranking(generation_ids=[chosen_id, rejected_id])
    events: list[Message] = [
        _generation(rejected_id, prompt, prompt_ids, preference.rejected, messages=messages),
        _generation(chosen_id, prompt, prompt_ids, preference.chosen, messages=messages),
        _feedback(name, digest, events_pb2.Feedback(generation_id=chosen_id, ranking=ranking)),
    ]
    return [_outgoing(event, chosen_id) for event in events]


def demonstration_events(
    demo: DemonstrationLine, name: str, prompts: PromptEncoder, limits: Limits
) -> list[Outgoing]:
    """A generation for the prompt (plain, as the sft stage reads RLHF_SFT_DATA) with no answer,
    then the correction carrying the response; raises LineError for what the sft stage would
    not train on."""
    from rlhf.training.sft import make_demonstration

    digest = line_digest("demonstration", name, [demo.prompt, demo.response])
    prompt_ids = prompts.encode(demo.prompt)
    try:
        make_demonstration(prompt_ids, prompts.encode(demo.response), limits.sft_max_tokens)
    except ValueError as exc:
        raise LineError(f"{exc} (the sft stage's limit)") from exc
    generation_id = f"{TENANT_PREFIX}{name}:{digest}:prompt"
    correction = events_pb2.Correction(text=demo.response)
    events: list[Message] = [
        _generation(generation_id, demo.prompt, prompt_ids, ""),
        _feedback(
            name, digest, events_pb2.Feedback(generation_id=generation_id, correction=correction)
        ),
    ]
    return [_outgoing(event, generation_id) for event in events]


def _outgoing(event: Message, key: str) -> Outgoing:
    topic = bus.GENERATIONS if isinstance(event, events_pb2.GenerationEvent) else bus.FEEDBACK
    return Outgoing(topic, key, event)


def line_events(
    kind: str, line: str, name: str, prompts: PromptEncoder, limits: Limits
) -> list[Outgoing]:
    """Validate one line of a `kind` file and build its events; raises LineError."""
    if kind == "preferences":
        return preference_events(parse_preference(line, limits), name, prompts, limits)
    if kind == "demonstrations":
        return demonstration_events(parse_demonstration(line, limits), name, prompts, limits)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------------------------
# Reading, publishing and the report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    line: int
    reason: str


@dataclass
class ImportReport:
    """What happened to every line of a file; `examples` keeps the first `keep` rejections
    (all when `keep` is 0), `rejected` counts them all."""

    kind: str
    path: str
    name: str
    dry_run: bool = False
    keep: int = 20
    lines: int = 0  # non-blank lines read
    valid: int = 0  # lines that passed validation
    imported: int = 0  # valid lines whose every event the broker acknowledged
    events: int = 0  # events the broker acknowledged
    rejected: int = 0
    examples: list[Rejection] = field(default_factory=list)
    unconfirmed: int = 0  # valid lines sent but not acknowledged
    broker_error: str = ""
    stopped_at: int = 0  # the line a broker failure stopped reading at (0: read to the end)

    def reject(self, line: int, reason: str) -> None:
        self.rejected += 1
        if self.keep == 0 or len(self.examples) < self.keep:
            self.examples.append(Rejection(line, reason))

    @property
    def exit_code(self) -> int:
        if self.broker_error:
            return EXIT_UNCONFIRMED if self.imported else EXIT_NOTHING_IMPORTED
        done = self.valid if self.dry_run else self.imported
        return EXIT_OK if done else EXIT_NOTHING_IMPORTED

    def summary(self) -> list[str]:
        """The report for a person, one line per fact and per rejected line shown."""
        head = f'{self.kind} {self.path} as "{self.name}": {_count(self.lines, "line")} read, '
        if self.dry_run:
            head += f"{self.valid} valid (dry run: nothing published)"
        else:
            head += f"{self.imported} imported ({self.events} events acknowledged)"
        lines = [f"{head}, {self.rejected} rejected"]
        lines += [f"  line {r.line}: {r.reason}" for r in self.examples]
        if self.rejected > len(self.examples):
            hidden = self.rejected - len(self.examples)
            lines.append(f"  ... and {hidden} more rejected lines (--show 0 lists them all)")
        if self.broker_error:
            lines.append(self._broker_failure())
        return lines

    def _broker_failure(self) -> str:
        where = f"reading stopped at line {self.stopped_at}" if self.stopped_at else "at the end"
        return (
            f"the broker did not confirm {_count(self.unconfirmed, 'line')} ({where}): "
            f"{self.broker_error}. "
            "Running the same command again is safe: events already stored carry the same ids "
            "and the trainers keep one copy."
        )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def read_lines(
    handle: IO[bytes], max_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of every line; None for a line over `max_bytes`, which is skipped
    without ever being held whole in memory."""
    number = 0
    while raw := handle.readline(max_bytes + 1):
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := handle.readline(max_bytes)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, raw


class _Pipeline:
    """Publishes lines' events without waiting for each, at most `window` lines in flight, and
    counts a line imported only when every one of its events was acknowledged."""

    def __init__(
        self, publisher: Publisher, report: ImportReport, window: int, timeout: float
    ) -> None:
        self._publisher = publisher
        self._report = report
        self._window = window
        self._timeout = timeout
        self._in_flight: deque[tuple[int, list[Any]]] = deque()

    @property
    def failed(self) -> bool:
        return bool(self._report.broker_error)

    def send(self, number: int, events: list[Outgoing]) -> None:
        futures = []
        try:
            for event in events:
                futures.append(self._publisher.publish_async(event.topic, event.key, event.message))
        except BusUnavailable as exc:
            # Events of this line already queued may still land: harmless, a re-run repeats ids.
            self._fail(str(exc))
            return
        self._in_flight.append((number, futures))
        while len(self._in_flight) > self._window:
            self._settle(*self._in_flight.popleft(), timeout=self._timeout)

    def finish(self) -> None:
        """Wait (bounded) for every line still in flight."""
        deadline = time.monotonic() + self._timeout
        while self._in_flight:
            number, futures = self._in_flight.popleft()
            self._settle(number, futures, timeout=max(0.0, deadline - time.monotonic()))

    def _settle(self, number: int, futures: list[Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            for future in futures:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # a failure or a timeout: not confirmed, so not imported
            self._fail(repr(exc))
            return
        self._report.imported += 1
        self._report.events += len(futures)

    def _fail(self, error: str) -> None:
        self._report.unconfirmed += 1
        self._report.broker_error = self._report.broker_error or error


Progress = Callable[[int, ImportReport], None]  # (bytes read so far, the report so far)


def import_file(
    kind: str,
    path: Path,
    name: str,
    prompts: PromptEncoder,
    publisher: Publisher | None,
    limits: Limits | None = None,
    keep: int = 20,
    window: int = WINDOW_LINES,
    timeout: float = 10.0,
    progress: Progress | None = None,
) -> ImportReport:
    """Validate every line of `path` and publish the events of the valid ones (none when
    `publisher` is None: a dry run). Lines repeating an earlier line are rejected: they would
    carry the same ids. Stops reading at the first broker failure."""
    report = ImportReport(kind, str(path), check_name(name), dry_run=publisher is None, keep=keep)
    check = _LineCheck(kind, name, prompts, limits or Limits(), report)
    pipeline = _Pipeline(publisher, report, window, timeout) if publisher else None
    with open(path, "rb") as handle:
        for number, raw in read_lines(handle):
            if pipeline is not None and pipeline.failed:
                report.stopped_at = number
                break
            events = check.events(number, raw)
            if events is not None and pipeline is not None:
                pipeline.send(number, events)
            if progress is not None and number % 200 == 0:
                progress(handle.tell(), report)
        if pipeline is not None:
            pipeline.finish()
        if progress is not None:
            progress(handle.tell(), report)
    return report


class _LineCheck:
    """Validates lines one by one into events, recording rejections in the report."""

    def __init__(
        self, kind: str, name: str, prompts: PromptEncoder, limits: Limits, report: ImportReport
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        self._kind, self._name, self._prompts, self._limits = kind, name, prompts, limits
        self._report = report
        self._first_seen: dict[str, int] = {}  # feedback event id -> line number

    def events(self, number: int, raw: bytes | None) -> list[Outgoing] | None:
        """The events of one line, or None (blank, or rejected and recorded)."""
        if raw is not None and not raw.strip():
            return None
        self._report.lines += 1
        try:
            if raw is None:
                raise LineError(f"longer than {MAX_LINE_BYTES} bytes")
            events = line_events(
                self._kind, decode_line(raw), self._name, self._prompts, self._limits
            )
        except LineError as exc:
            self._report.reject(number, str(exc))
            return None
        # The feedback's event id stands for the line's content: a repeat would be dropped
        # downstream anyway, so say so here rather than count it imported twice.
        event_id = events[-1].message.event_id
        if event_id in self._first_seen:
            self._report.reject(number, f"same content as line {self._first_seen[event_id]}")
            return None
        self._first_seen[event_id] = number
        self._report.valid += 1
        return events


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The import command's arguments, for `python -m rlhf.importer` and `rlhf import`."""
    parser.add_argument(
        "kind",
        choices=KINDS,
        help="preferences: HH-RLHF chosen/rejected JSONL; demonstrations: prompt/response JSONL",
    )
    parser.add_argument("file", type=Path, help="JSONL file, one example per line")
    parser.add_argument(
        "--name", required=True, help="dataset name: marks the events and their ids"
    )
    parser.add_argument("--kafka", metavar="HOST:PORT", help="default: $RLHF_KAFKA_BOOTSTRAP")
    parser.add_argument("--dry-run", action="store_true", help="validate and report only")
    parser.add_argument(
        "--show", type=int, default=20, metavar="N", help="rejected lines to print (20; 0 = all)"
    )
    parser.add_argument(
        "--sft-max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="demonstrations: longer ones are rejected (default: RLHF_SFT_MAX_TOKENS, as the sft "
        f"stage reads it; {SFTConfig.max_tokens} when unset)",
    )


def run(args: argparse.Namespace) -> int:
    """Run an import from parsed `add_arguments` arguments; print the report; exit status."""
    try:
        check_name(args.name)
        config = load_config(CommonConfig)
        bus.configure(config.kafka)  # the cluster's TLS and SASL settings
        limits = Limits.from_environment()
    except ValueError as exc:  # ConfigError is a ValueError too
        print(f"rlhf import: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.file.is_file():
        print(f"rlhf import: {args.file} is not a readable file", file=sys.stderr)
        return EXIT_NOTHING_IMPORTED
    from rlhf.models import load_tokenizer

    prompts = TokenizerPrompts(load_tokenizer(config.cache_dir))
    if args.sft_max_tokens is not None:
        limits = dataclasses.replace(limits, sft_max_tokens=args.sft_max_tokens)
    publisher = None
    if not args.dry_run:
        publisher = Publisher(
            args.kafka or config.kafka_bootstrap,
            client_id="rlhf-import",
            # A bulk load wants throughput, not one event's latency: fuller batches, and more
            # patience with a busy broker before a line counts as not confirmed.
            max_block_ms=10_000,
            delivery_timeout_ms=IMPORT_DELIVERY_TIMEOUT_MS,
            linger_ms=20,
        )
    try:
        with _progress_bar(args.file) as progress:
            report = import_file(
                args.kind,
                args.file,
                args.name,
                prompts,
                publisher,
                limits,
                keep=max(0, args.show),
                timeout=IMPORT_DELIVERY_TIMEOUT_MS / 1000 + 5,
                progress=progress,
            )
    finally:
        if publisher is not None:
            publisher.close()
    for line in report.summary():
        print(line)
    return report.exit_code


@contextlib.contextmanager
def _progress_bar(path: Path) -> Iterator[Progress | None]:
    """A rich progress bar over the file's bytes on a terminal's stderr, else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[counts]}"),
    )
    with Bar(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(path.name, total=path.stat().st_size, counts="")

        def update(done: int, report: ImportReport) -> None:
            kept = f"{report.valid} valid" if report.dry_run else f"{report.imported} imported"
            counts = f"{kept}, {report.rejected} rejected"
            bar.update(task, completed=done, counts=counts)

        yield update


EPILOG = (
    "exit status: 0 imported, 1 nothing imported, 2 bad usage, 3 the broker did not confirm "
    "every line (run the same command again)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf.importer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
