"""`rlhf`: the platform from a terminal: generate, rate answers, watch and steer the trainer,
import offline datasets.

Addresses come from flags, then environment variables (RLHF_GENERATION_ADDRESS, ...), then the
`run/up.env` that `make up` writes, then the local `make up` ports. Keys come the same way: the
app's (RLHF_API_KEY: generate, feedback) and the operator's (RLHF_OPERATOR_KEY: pause, resume,
rollback, promote, checkpoints and status; a reader key, RLHF_READER_KEY, is enough for status and
checkpoints). With RLHF_TLS_CA_FILE set, calls use TLS verified against it (and present
RLHF_TLS_CERT_FILE where the services require client certificates). Every failure is one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console
from rich.table import Table

from rlhf import importer
from rlhf.auth import ClientSecurity, dial
from rlhf.config import TlsSettings, load_config
from rlhf.local import UP_ENV, address_variable, default_address, read_env_file
from rlhf.v1 import (
    common_pb2,
    events_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

EXIT_FAILED = 1  # the server refused, or could not be reached
EXIT_USAGE = 2  # argparse's status for a bad command line
EXIT_INTERRUPTED = 130
SERVICES = ("generation", "feedback", "trainer", "reward-trainer", "release-trainer")
STAGE_SERVICE = {"ppo": "trainer", "reward": "reward-trainer", "release": "release-trainer"}
VERDICTS = {
    "promote": trainer_pb2.RELEASE_VERDICT_PROMOTE,
    "rollback": trainer_pb2.RELEASE_VERDICT_ROLLBACK,
}
THUMBS = {"up": events_pb2.THUMB_UP, "down": events_pb2.THUMB_DOWN}


class CommandError(Exception):
    """A failure to report to the user as one line."""


class UsageError(CommandError):
    """The command line does not make sense (exit status 2, like argparse)."""


@dataclass(frozen=True)
class Target:
    """A service a command talks to, named in error messages."""

    name: str
    address: str


def _connection_failed(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE raised by the client itself (nothing listening), not sent by a server."""
    details = (exc.details() or "").lower()
    return "connect" in details or "connection refused" in details or "dns" in details


def explain(target: Target, exc: grpc.RpcError, timeout: float) -> str:
    """A one-line, human message for a failed call."""
    code, details = exc.code(), exc.details() or ""
    where = f"{target.name} ({target.address})"
    if code == grpc.StatusCode.UNAVAILABLE and _connection_failed(exc):
        return f"cannot reach {where}: is `make up` running?"
    messages = {
        grpc.StatusCode.UNAVAILABLE: f"{where} is unavailable: {details}",
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            f"{where} did not answer within {timeout:g} s (try a larger --timeout)"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            f"{where} refused the {_key_hint(target.name)} (`make up` writes it to {UP_ENV})"
        ),
        grpc.StatusCode.UNIMPLEMENTED: (
            f"{where} does not implement this call (an older version of the service?)"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED: f"{where} is overloaded, try again: {details}",
        grpc.StatusCode.INVALID_ARGUMENT: f"{where} rejected the request: {details}",
        grpc.StatusCode.PERMISSION_DENIED: f"{where} refused: {details}"
        + (" (this needs the operator key)" if target.name in STAGE_SERVICE.values() else ""),
        grpc.StatusCode.FAILED_PRECONDITION: f"{where} refused: {details}",
        grpc.StatusCode.NOT_FOUND: f"{where}: not found: {details}",
        grpc.StatusCode.ALREADY_EXISTS: f"{where}: {details}",
    }
    return messages.get(code, f"{where} failed with {code.name}: {details}")


def _key_hint(service: str) -> str:
    if service in STAGE_SERVICE.values():
        return "operator key: pass --operator-key or set RLHF_OPERATOR_KEY"
    return "API key: pass --api-key or set RLHF_API_KEY"


class Session:
    """Channels to the services, opened on first use and closed at the end of the command;
    each presents its service's key (`keys`, by service name) over `security`'s TLS."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        timeout: float,
        keys: Mapping[str, str] | None = None,
        security: ClientSecurity = ClientSecurity(),
        configured: frozenset[str] = frozenset(SERVICES),
    ) -> None:
        self.addresses = dict(addresses)
        # services given an address (flag, environment, up.env): the others are only defaults
        self.configured = configured
        self.timeout = timeout
        self.keys = dict(keys or {})
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}

    def target(self, service: str) -> Target:
        return Target(service, self.addresses[service])

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            security = self.security.with_key(self.keys.get(service, ""))
            self._channels[service] = dial(self.addresses[service], security)
        return self._channels[service]

    def generation(self) -> generation_pb2_grpc.GenerationServiceStub:
        return generation_pb2_grpc.GenerationServiceStub(self.channel("generation"))

    def feedback(self) -> feedback_pb2_grpc.FeedbackServiceStub:
        return feedback_pb2_grpc.FeedbackServiceStub(self.channel("feedback"))

    def trainer(self, service: str = "trainer") -> trainer_pb2_grpc.TrainerServiceStub:
        return trainer_pb2_grpc.TrainerServiceStub(self.channel(service))

    @contextlib.contextmanager
    def calling(self, service: str) -> Iterator[None]:
        """Turn a failed call to `service` into a CommandError with a human message."""
        try:
            yield
        except grpc.RpcError as exc:
            raise CommandError(explain(self.target(service), exc, self.timeout)) from exc

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def given_addresses(
    flags: Mapping[str, str | None], environ: Mapping[str, str], env_file: Path
) -> dict[str, str]:
    """The services whose address was given: flag, else environment, else up.env."""
    from_file = read_env_file(env_file)
    given = {}
    for service in SERVICES:
        variable = address_variable(service)
        address = flags.get(service) or environ.get(variable) or from_file.get(variable)
        if address:
            given[service] = address
    return given


def resolve_addresses(
    flags: Mapping[str, str | None], environ: Mapping[str, str], env_file: Path
) -> dict[str, str]:
    """Each service's address: flag, else environment, else up.env, else the local default."""
    given = given_addresses(flags, environ, env_file)
    return {service: given.get(service) or default_address(service) for service in SERVICES}


def api_key(flag: str | None, environ: Mapping[str, str], env_file: Path) -> str:
    key = flag or environ.get("RLHF_API_KEY") or read_env_file(env_file).get("RLHF_API_KEY")
    if not key:
        raise CommandError(
            f"feedback needs an API key: pass --api-key or set RLHF_API_KEY "
            f"(`make up` writes one to {UP_ENV})"
        )
    return key


def resolve_keys(
    api: str | None, operator: str | None, environ: Mapping[str, str], env_file: Path
) -> dict[str, str]:
    """The key each service is called with: the app's for generation and feedback, the
    operator's (else a reader's) for the trainers; "" when none is known (the service then
    says UNAUTHENTICATED, and the message says which key to pass)."""
    from_file = read_env_file(env_file)

    def first(flag: str | None, *variables: str) -> str:
        found = [flag, *(environ.get(v) or from_file.get(v) for v in variables)]
        return next((key for key in found if key), "")

    app = first(api, "RLHF_API_KEY")
    control = first(operator, "RLHF_OPERATOR_KEY", "RLHF_READER_KEY")
    return {
        "generation": app or control,
        "feedback": app,
        "trainer": control,
        "reward-trainer": control,
        "release-trainer": control,
    }


# --- formatting ---------------------------------------------------------------------------


def _age(stamp: Timestamp) -> str:
    age = max(0, int(time.time()) - stamp.seconds)
    return f"{age} s" if age < 120 else f"{age // 60} min" if age < 7200 else f"{age // 3600} h"


def _local(stamp: Timestamp, layout: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(layout, time.localtime(stamp.seconds))


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return f"{_local(stamp)} ({_age(stamp)} ago)"


def _metrics_table(title: str, metrics: Mapping[str, float]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        table.add_row(name, f"{metrics[name]:.4g}")
    return table


def _facts(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column table of named values."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column()
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    return table


def _state(status: trainer_pb2.TrainerStatus) -> str:
    return "paused" if status.paused else "running"  # the phase row says doing what


def policy_table(info: generation_pb2.PolicyInfo) -> Table:
    return _facts(
        "served policy (generation)",
        [
            ("version", f"v{info.version}"),
            ("model", f"{info.model} ({info.backend} backend)"),
            ("loaded", _when(info.loaded_at)),
            ("manifest", info.manifest_sha256[:16] or "base model"),
            *(
                [("canary", f"v{info.candidate_version} answers {info.candidate_share:.0%}")]
                if info.candidate_version
                else []
            ),
        ],
    )


def ppo_table(status: trainer_pb2.TrainerStatus) -> Table:
    return _facts(
        "ppo trainer",
        [
            ("state", _state(status)),
            *_phase(status),
            ("algorithm", status.algorithm or "ppo"),
            ("step", str(status.step)),
            ("published policy", f"v{status.policy_version}"),
            (
                "mean reward (last batch)",
                f"{status.mean_reward:+.3f} (reward model v{status.reward_version})",
            ),
            ("KL to reference", f"{status.kl:.4f}"),
            ("pending prompts", str(status.pending_prompts)),
            ("feedback consumed / used", f"{status.feedback_consumed} / {status.feedback_used}"),
            ("prompts dropped", str(status.dropped_prompts)),
            ("consumer lag", str(status.consumer_lag)),
            ("data staleness", f"{status.data_staleness_seconds:.0f} s"),
        ],
    )


def _phase(status: trainer_pb2.TrainerStatus) -> list[tuple[str, str]]:
    """The stage's phase and why (absent from a stage that does not report one)."""
    if not status.phase:
        return []
    detail = f": {status.phase_detail}" if status.phase_detail else ""
    return [("phase", f"{status.phase}{detail}")]


def reward_table(status: trainer_pb2.TrainerStatus) -> Table:
    headline = ("heldout/pairwise_accuracy", "agreement/thumbs_auc")
    return _facts(
        "reward trainer",
        [
            ("state", _state(status)),
            *_phase(status),
            ("rounds", str(status.step)),
            ("published reward model", f"v{status.reward_version}"),
            ("new examples", str(status.pending_prompts)),
            ("feedback consumed", str(status.feedback_consumed)),
            *((name, f"{status.metrics[name]:.3f}") for name in headline if name in status.metrics),
        ],
    )


def checkpoints_table(
    title: str, checkpoints: Sequence[trainer_pb2.CheckpointInfo], served: int | None
) -> Table:
    # Borderless and short cells: the table fits 80 columns.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("version", "parent", "created", "age", "manifest", "note"):
        table.add_column(column)
    for info in checkpoints:
        notes = ["served"] if info.version == served else []
        if info.rolled_back_from:
            notes.append(f"weights of v{info.rolled_back_from}")
        table.add_row(
            f"v{info.version}",
            f"v{info.parent_version}",
            _local(info.created_at, "%Y-%m-%d %H:%M"),
            _age(info.created_at),
            info.manifest_sha256[:8],
            ", ".join(notes),
        )
    return table


def _trainer_line(name: str, status: trainer_pb2.TrainerStatus) -> str:
    version = status.reward_version if status.stage == "reward" else status.policy_version
    return f"{name} {_state(status)} at step {status.step}, last published v{version}"


# --- commands -----------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, session: Session, console: Console) -> int:
    sampling = common_pb2.SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    if args.seed is not None:
        sampling.seed = args.seed
    request = generation_pb2.GenerateRequest(sampling=sampling)
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.append(common_pb2.ChatMessage(role="user", content=args.prompt))
    final = None
    with session.calling("generation"):
        for item in session.generation().GenerateStream(request, timeout=session.timeout):
            if item.HasField("token") and not args.json:
                sys.stdout.write(item.token.text)
                sys.stdout.flush()
            elif item.HasField("final"):
                final = item.final
    if final is None:
        raise CommandError("generation ended the stream without a final answer")
    if args.json:
        print(MessageToJson(final, indent=2))
    else:
        print()
        # On stderr, so stdout is exactly the answer when piped.
        print(
            f"generation id {final.generation_id}\npolicy v{final.policy_version}, "
            f"{final.completion_tokens} tokens, finished by {final.finish_reason}",
            file=sys.stderr,
        )
    return 0


def set_signal(feedback: events_pb2.Feedback, kind: str, values: Sequence[str]) -> None:
    """Fill in the signal from the command line words; UsageError when they do not fit."""
    wanted = {"up": "no value", "down": "no value", "correct": "one TEXT", "score": "one number"}
    if kind == "rank":
        if len(values) < 2:
            raise UsageError("rank takes the generation ids best first, at least two")
        feedback.ranking.generation_ids.extend(values)
        return
    if len(values) != (0 if kind in THUMBS else 1):
        raise UsageError(f"{kind} takes {wanted[kind]}")
    if kind in THUMBS:
        feedback.thumb = THUMBS[kind]
    elif kind == "correct":
        feedback.correction.text = values[0]
    else:
        try:
            feedback.score.value = float(values[0])
        except ValueError:
            raise UsageError(f"score takes a number in [0, 1], not {values[0]!r}") from None


def cmd_feedback(args: argparse.Namespace, session: Session, console: Console) -> int:
    feedback = events_pb2.Feedback(
        generation_id=args.generation_id,
        idempotency_key=args.idempotency_key or uuid.uuid4().hex,
        comment=args.comment,
        tags=args.tag,
    )
    set_signal(feedback, args.signal, args.values)
    key = api_key(args.api_key, os.environ, args.env_file)
    try:
        with session.calling("feedback"):
            reply = session.feedback().SubmitFeedback(
                feedback_pb2.SubmitFeedbackRequest(feedback=feedback),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=session.timeout,
            )
    except CommandError as exc:
        # Not confirmed is not lost: the same key makes a resend count once.
        raise CommandError(
            f"{exc} (to resend: --idempotency-key {feedback.idempotency_key})"
        ) from exc
    state = "already stored" if reply.duplicate else "stored"
    console.print(
        f"{state}: event {reply.event_id} (partition {reply.partition}, offset {reply.offset}, "
        f"idempotency key {feedback.idempotency_key})",
    )
    return 0


def cmd_status(args: argparse.Namespace, session: Session, console: Console) -> int:
    with session.calling("generation"):
        info = session.generation().GetPolicyInfo(
            generation_pb2.GetPolicyInfoRequest(), timeout=session.timeout
        )
    with session.calling("trainer"):
        ppo = session.trainer().GetStatus(trainer_pb2.GetStatusRequest(), timeout=session.timeout)
    console.print(policy_table(info))
    console.print(ppo_table(ppo))
    if args.verbose and ppo.metrics:
        console.print(_metrics_table("last PPO update", ppo.metrics))
    try:
        with session.calling("reward-trainer"):
            reward = session.trainer("reward-trainer").GetStatus(
                trainer_pb2.GetStatusRequest(), timeout=session.timeout
            )
    except CommandError as exc:  # optional: a deployment may train its reward model elsewhere
        console.print(f"reward trainer: {exc}", style="dim")
        return 0
    console.print(reward_table(reward))
    if args.verbose and reward.metrics:
        console.print(_metrics_table("reward model", reward.metrics))
    if "release-trainer" not in session.configured:  # make up runs one only with RELEASES=1
        console.print(
            "release stage: none (every new policy serves everyone at once; canaries: "
            "`make up RELEASES=1`, or --release-trainer ADDRESS)",
            style="dim",
        )
        return 0
    try:
        with session.calling("release-trainer"):
            release = session.trainer("release-trainer").GetStatus(
                trainer_pb2.GetStatusRequest(), timeout=session.timeout
            )
    except CommandError as exc:  # optional: without it every new policy serves at once
        console.print(f"release stage: {exc}", style="dim")
        return 0
    console.print(release_table(release))
    return 0


def release_table(status: trainer_pb2.TrainerStatus) -> Table:
    release = status.release
    rows = [("incumbent", f"v{release.incumbent_version}")]
    if release.candidate_version:
        rows += [
            (
                "canary",
                f"v{release.candidate_version} answers {release.candidate_share:.0%} "
                f"for {release.elapsed_seconds / 60:.0f} min",
            ),
            (
                "thumbs up",
                f"candidate {release.candidate_thumbs_up}/{release.candidate_thumbs}, "
                f"incumbent {release.incumbent_thumbs_up}/{release.incumbent_thumbs}",
            ),
            (
                "verdict",
                f"{release.verdict}: difference {release.difference:+.3f} "
                f"[{release.lower:+.3f}, {release.upper:+.3f}]",
            ),
        ]
    else:
        rows.append(("canary", "none running"))
    if release.last_decision:
        rows.append(("last decision", release.last_decision))
    gate = release.gate
    if gate.candidate_version:
        rows.append(("last gate", gate.summary))
        for name, measures in (("candidate", gate.candidate), ("incumbent", gate.incumbent)):
            if gate.HasField(name):
                rows.append(("", f"{name}: {_gate_measures(measures)}"))
    return _facts("release (canary)", [*rows, *_phase(status)])


def _gate_measures(m: trainer_pb2.GateMeasures) -> str:
    reward = f"reward {m.reward:+.3f}" if m.reward_scored else "reward not scored"
    return (
        f"{reward}, {m.length:.1f} tokens, {m.repetition:.1%} repeated bigrams, KL {m.kl:.2f} nats"
    )


def _served_version(session: Session) -> int | None:
    """The generation service's version, or None when it cannot say (it is only a marker)."""
    try:
        info = session.generation().GetPolicyInfo(generation_pb2.GetPolicyInfoRequest(), timeout=5)
    except grpc.RpcError:
        return None
    return info.version


def cmd_checkpoints(args: argparse.Namespace, session: Session, console: Console) -> int:
    service = STAGE_SERVICE[args.stage]
    with session.calling(service):
        reply = session.trainer(service).ListCheckpoints(
            trainer_pb2.ListCheckpointsRequest(limit=args.limit), timeout=session.timeout
        )
    if not reply.checkpoints:
        console.print(f"no {args.stage} checkpoints yet")
        return 0
    served = _served_version(session) if args.stage == "ppo" else None
    kind = "policy" if args.stage == "ppo" else "reward model"
    console.print(checkpoints_table(f"{kind} checkpoints, newest first", reply.checkpoints, served))
    return 0


def _wait_served(session: Session, version: int) -> bool:
    """Poll the generation service until it serves `version` or newer, within the timeout."""
    deadline = time.monotonic() + session.timeout
    while time.monotonic() < deadline:
        served = _served_version(session)
        if served is not None and served >= version:
            return True
        time.sleep(0.5)
    return False


def cmd_decide(args: argparse.Namespace, session: Session, console: Console) -> int:
    """End the running canary (release stage): promote its candidate or roll it back."""
    verdict = "promote" if args.command == "promote" else "rollback"
    with session.calling("release-trainer"):
        status = session.trainer("release-trainer").Decide(
            trainer_pb2.DecideRequest(verdict=VERDICTS[verdict]), timeout=session.timeout
        )
    console.print(status.release.last_decision)  # what was decided, in a sentence
    return 0


def cmd_rollback(args: argparse.Namespace, session: Session, console: Console) -> int:
    if args.version is None:  # the canary, not a version: the release stage's
        return cmd_decide(args, session, console)
    # The served policy only: the ppo stage owns it (the reward stage refuses rollbacks).
    with session.calling("trainer"):
        info = session.trainer().Rollback(
            trainer_pb2.RollbackRequest(version=args.version, pause=args.pin),
            timeout=session.timeout,
        )
    console.print(
        f"published v{info.version} with the weights of v{info.rolled_back_from or args.version}"
    )
    if args.pin:
        console.print(f"ppo trainer paused: v{info.version} stays until `rlhf resume`")
    if args.wait:
        if not _wait_served(session, info.version):
            raise CommandError(
                f"generation does not serve v{info.version} after {session.timeout:g} s "
                "(see `rlhf status`)"
            )
        console.print(f"generation serves v{info.version}")
    return 0


def cmd_release(args: argparse.Namespace, session: Session, console: Console) -> int:
    """Publishes a release event to the broker (generation replicas with
    RLHF_GENERATION_RELEASES follow it); the versions' manifests are read from the store."""
    from rlhf import bus
    from rlhf.canary import release_event
    from rlhf.checkpoints import POLICY, CheckpointError, CheckpointStore
    from rlhf.config import CommonConfig

    try:
        config = load_config(CommonConfig)
        bus.configure(config.kafka)
        store = CheckpointStore(args.checkpoint_dir or config.checkpoint_dir)
        event = release_event(
            store, POLICY, args.incumbent, args.candidate, args.share, args.reason
        )
    except (ValueError, CheckpointError) as exc:
        raise UsageError(str(exc)) from exc
    with bus.Publisher(args.kafka or config.kafka_bootstrap, client_id="rlhf-release") as out:
        try:
            out.publish(bus.RELEASES, POLICY, event)
        except bus.BusUnavailable as exc:
            raise CommandError(f"the release was not confirmed by the broker: {exc}") from exc
    canary = f", candidate v{args.candidate} for {args.share:.0%}" if args.candidate else ""
    console.print(f"released: v{args.incumbent}{canary}")
    return 0


def cmd_import(args: argparse.Namespace, session: Session, console: Console) -> int:
    """Talks to the broker, not to the services: the session is unused."""
    return importer.run(args)


def _control(rpc: str) -> Callable[[argparse.Namespace, Session, Console], int]:
    """pause and resume: the same call shape, a different RPC."""
    requests = {"Pause": trainer_pb2.PauseRequest, "Resume": trainer_pb2.ResumeRequest}

    def command(args: argparse.Namespace, session: Session, console: Console) -> int:
        service = STAGE_SERVICE[args.stage]
        with session.calling(service):
            status = getattr(session.trainer(service), rpc)(
                requests[rpc](), timeout=session.timeout
            )
        console.print(_trainer_line(f"{args.stage} trainer", status))
        return 0

    return command


# --- command line -------------------------------------------------------------------------


def _stage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage", choices=sorted(STAGE_SERVICE), default="ppo", help="trainer stage (ppo)"
    )


def _feedback_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    feedback = command(
        "feedback",
        help="rate a generation: up, down, a ranking, a correction or a score",
        description="Rate a generation, one signal per submission:\n"
        "  rlhf feedback ID up | down\n"
        "  rlhf feedback ID rank ID1 ID2 [...]   generation ids best first, ID among them\n"
        "  rlhf feedback ID correct TEXT         a better answer\n"
        "  rlhf feedback ID score X              X in [0, 1]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    feedback.add_argument("generation_id", metavar="ID")
    feedback.add_argument("signal", choices=("up", "down", "rank", "correct", "score"))
    feedback.add_argument("values", nargs="*", metavar="VALUE")
    feedback.add_argument("--comment", default="")
    feedback.add_argument("--tag", action="append", default=[], help="repeatable")
    feedback.add_argument(
        "--idempotency-key", help="resend with the same key to count once (default: random)"
    )
    feedback.add_argument("--api-key", help=f"default: $RLHF_API_KEY, else {UP_ENV}")
    feedback.set_defaults(run=cmd_feedback)


def _connection_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """Addresses and timeout. Each subcommand accepts them too (`rlhf status --timeout 5`),
    without defaults there so they do not overwrite a value given before the subcommand."""

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    for service in SERVICES:
        parser.add_argument(
            f"--{service}",
            metavar="HOST:PORT",
            default=default(None),
            help=f"default: ${address_variable(service)}, else {UP_ENV}, "
            f"else {default_address(service)}",
        )
    parser.add_argument("--env-file", type=Path, default=default(UP_ENV), help=f"default: {UP_ENV}")
    parser.add_argument(
        "--operator-key",
        default=default(None),
        help=f"for the trainers: default $RLHF_OPERATOR_KEY, else $RLHF_READER_KEY, else {UP_ENV}",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(60.0), help="seconds per call (60)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 done, 1 the service refused or could not be reached, 2 bad usage",
    )
    _connection_options(parser, with_defaults=True)
    shared = argparse.ArgumentParser(add_help=False)
    _connection_options(shared, with_defaults=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **options: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[shared], **options)

    generate = command("generate", help="answer a prompt, streaming the tokens")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    generate.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (0.7)")
    generate.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--raw", action="store_true", help="send as a raw prompt, not a chat")
    generate.add_argument("--json", action="store_true", help="print the final answer as JSON")
    generate.set_defaults(run=cmd_generate)

    _feedback_parser(command)

    status = command("status", help="served policy and trainer progress")
    status.add_argument("-v", "--verbose", action="store_true", help="every trainer metric")
    status.set_defaults(run=cmd_status)

    checkpoints = command("checkpoints", help="checkpoints in the store")
    checkpoints.add_argument("--limit", type=int, default=0, help="0 = all")
    _stage_flag(checkpoints)
    checkpoints.set_defaults(run=cmd_checkpoints)

    rollback = command(
        "rollback",
        help="serve an earlier policy again (republished as a new version); without a version, "
        "roll back the running canary (release stage)",
    )
    rollback.add_argument("version", type=int, nargs="?")
    rollback.add_argument("--pin", action="store_true", help="pause training: keep serving it")
    rollback.add_argument(
        "--wait", action="store_true", help="wait until the generation service serves it"
    )
    rollback.set_defaults(run=cmd_rollback)

    promote = command(
        "promote", help="promote the running canary's candidate to every user (release stage)"
    )
    promote.set_defaults(run=cmd_decide)

    release = command(
        "release",
        help="choose the served policy: an incumbent, and a canary candidate for a share of users",
        description="Publish a release event: generation replicas running with "
        "RLHF_GENERATION_RELEASES serve the incumbent, and the candidate to --share of user "
        "requests (sticky per user key). Talks to the broker and reads the checkpoint store.",
    )
    release.add_argument("incumbent", type=int, help="policy version answering by default")
    release.add_argument("--candidate", type=int, default=0, help="policy version on trial")
    release.add_argument(
        "--share", type=float, default=0.1, help="candidate's share of user requests (0.1)"
    )
    release.add_argument("--reason", default="operator", help="recorded in the event")
    release.add_argument("--kafka", metavar="HOST:PORT", help="default: $RLHF_KAFKA_BOOTSTRAP")
    release.add_argument(
        "--checkpoint-dir", type=Path, help="the store; default: $RLHF_CHECKPOINT_DIR"
    )
    release.set_defaults(run=cmd_release)

    offline = subparsers.add_parser(
        "import",
        help="publish an offline dataset (preferences or demonstrations) as live events",
        description=importer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=importer.EPILOG,
    )
    importer.add_arguments(offline)
    offline.set_defaults(run=cmd_import)

    for name, rpc, text in (
        ("pause", "Pause", "stop training after the current update"),
        ("resume", "Resume", "continue training"),
    ):
        control = command(name, help=text)
        _stage_flag(control)
        control.set_defaults(run=_control(rpc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    flags = {service: getattr(args, service.replace("-", "_")) for service in SERVICES}
    try:
        tls = load_config(TlsSettings)
    except ValueError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return EXIT_USAGE
    keys = resolve_keys(
        getattr(args, "api_key", None), args.operator_key, os.environ, args.env_file
    )
    session = Session(
        resolve_addresses(flags, os.environ, args.env_file),
        args.timeout,
        keys,
        ClientSecurity.of(tls, key=""),
        frozenset(given_addresses(flags, os.environ, args.env_file)),
    )
    # No markup: server messages may contain brackets ("score must be in [0, 1]"). Soft wrap:
    # message lines stay whole for scripts and copy and paste; tables still fit the width.
    console = Console(highlight=False, markup=False, soft_wrap=True)
    try:
        return args.run(args, session, console)
    except CommandError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `rlhf ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not fail again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
