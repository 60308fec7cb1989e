"""``ctx``: the authoring API. Every call is a recorded step with a sequence number; on replay a
recorded step returns its recorded result, and the first unrecorded call executes for real."""

import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

import jsonschema
from django.db import connection
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_args, canonical_json, sha256_hex
from orchestration.engine import faults, handoffs
from orchestration.engine.errors import (
    INFRASTRUCTURE_ERRORS,
    REPLAYABLE,
    ActionDenied,
    ActionRejected,
    BudgetExceeded,
    CheckFailed,
    Halted,
    Interrupted,
    InvalidArguments,
    NonDeterminismError,
    NonRetryable,
    SliceEnded,
    StepFailed,
    Suspend,
    ToolUnavailable,
    WorkflowError,
    WorkflowMisuse,
    is_outage,
)
from orchestration.engine.retry import RETRY_POLICIES, is_retryable
from orchestration.engine.steps import (
    LeaseKeeper,
    Outbox,
    lease_fence,
    step_finish,
    step_start,
    subtree_labels,
)
from orchestration.engine.timeouts import CallAbandoned, call_with_timeout
from orchestration.gate import Action, Answer, Question, get_gate
from orchestration.registry.declare import TOOLS, get_tool, get_workflow
from orchestration.registry.models import Agent
from orchestration.runs.models import Event, Run, Step, StepKind, StepStatus

DONE = {StepStatus.COMPLETED, StepStatus.FAILED}
OVERRUN_GRACE_SECONDS = 5.0  # how long a call that overran its timeout has to end by itself
CUT_SHORT_LIMIT = 10  # attempts of one step cut short (crashes, outages) before it fails


@dataclass(frozen=True)
class Acting:
    """Inside ``ctx.agent(...)``: the agent acting and the tools its loop offered the model."""

    agent: Agent
    offered: frozenset[str]


def _interruptible(method: Callable) -> Callable:
    """An authoring call whose database work could not complete (the engine's step records and
    fences, the gate's queries: a dropped connection, a lock not granted, a cancelled query)
    raises ``Interrupted``, a control signal: an ``except Exception`` in workflow code, or an
    agent loop, can never take the engine's trouble for the step's result and carry on without
    the step. (A tool's own errors are the step's result, handled in ``_execute``; data the
    database refuses to store still fails the run.) A step cut short again and again is bounded
    by ``CUT_SHORT_LIMIT``."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._outside_workflow_transactions()
        try:
            return method(self, *args, **kwargs)
        except INFRASTRUCTURE_ERRORS as exc:
            raise Interrupted(f"{type(exc).__name__}: {exc}") from exc

    return call


class Context:
    def __init__(self, run: Run, steps: dict[int, Step], *, lease: str, slice_seconds: float):
        self.run = run
        self._steps = steps
        self._lease = lease
        self._seq = 0
        self._slice_ends = time.monotonic() + slice_seconds
        self._gate = get_gate()
        self.outbox = Outbox(run.pk)
        self._calls: Counter[str] = Counter()  # loop detection: tool + canonical arguments
        self._acting: Acting | None = None
        self._limit: frozenset[str] | None = None
        self._atomic_depth = len(connection.atomic_blocks)  # the slice's own, if any
        self.labels: set[str] = set()
        self._tokens = sum(s.tokens for s in steps.values())
        self._cost = float(sum(s.cost_usd for s in steps.values()))
        self._counted = sum(
            1 for s in steps.values() if s.status in DONE and s.kind != StepKind.BUDGET
        )

    # --- step machinery -------------------------------------------------------------------

    def _next(self, kind: str, name: str) -> tuple[int, Step | None]:
        self._seq += 1
        step = self._steps.get(self._seq)
        while step is not None and step.kind == StepKind.BUDGET:
            self._settle_budget(step)  # an extension recorded before this call
            self._seq += 1
            step = self._steps.get(self._seq)
        if step is None:
            self._before_new_call(self._seq)
            exhausted = self._exhausted_budget()
            if exhausted:
                self._settle_budget(self._ask_to_extend(*exhausted))
                self._seq += 1
        elif step.kind != kind or step.name != name:
            raise NonDeterminismError(
                f"step {self._seq}: the workflow now calls {kind} {name!r} where the run "
                f"recorded {step.kind} {step.name!r}"
            )
        return self._seq, step

    def _replay(self, step: Step) -> Any:
        self.labels.update(step.labels or [])
        if step.status == StepStatus.COMPLETED:
            return step.output
        error_class = REPLAYABLE.get(step.error_type)
        if error_class is None or error_class is StepFailed:
            raise StepFailed(step.error, error_type=step.error_type)
        raise error_class(step.error)

    @property
    def position(self) -> int:
        return self._seq

    @property
    def replaying(self) -> bool:
        return self._seq < max(self._steps, default=0)

    def _before_new_call(self, seq: int) -> None:
        """Checked before a call executes: the time slice."""
        if time.monotonic() > self._slice_ends:
            raise SliceEnded()

    def _exhausted_budget(self) -> tuple[str, float, float] | None:
        """Budgets are checked before each new call: the first one used up, if any."""
        budgets = self.run.budgets or {}
        started = self.run.started_at or timezone.now()
        spent = {
            "max_steps": self._counted,
            "max_tokens": self._tokens,
            "max_cost_usd": self._cost,
            "max_wall_seconds": (timezone.now() - started).total_seconds(),
        }
        for budget, used in spent.items():
            limit = budgets.get(budget)
            if limit is not None and used >= limit:
                return budget, limit, used
        return None

    def _ask_to_extend(self, budget: str, limit: float, used: float) -> Step:
        name = budget.removeprefix("max_")
        if not (self.run.budgets or {}).get("ask_to_extend"):
            raise BudgetExceeded(f"{name} budget of {limit} exhausted")
        step = self._start(
            self._seq,
            StepKind.BUDGET,
            f"extend {name} budget",
            {"budget": budget, "limit": limit, "used": round(used, 6)},
            None,
            status=StepStatus.WAITING,
            message=f"The {name} budget of {limit} is exhausted; asked a reviewer to extend it.",
        )
        return step

    def _settle_budget(self, step: Step) -> None:
        """Apply a budget extension step: extended, declined, or still waiting for an answer."""
        budget, limit = step.input["budget"], step.input["limit"]
        name = budget.removeprefix("max_")
        if step.status == StepStatus.WAITING:
            answer = self._gate.ask_human(
                Question(
                    text=f"Run {self.run.pk} used its {name} budget of {limit}. Extend it to "
                    f"{limit * 2}?",
                    choices=("Extend", "Stop"),
                    context={"budget": budget, "limit": limit, "used": step.input["used"]},
                ),
                run_id=self.run.pk,
                step_seq=step.seq,
            )
            if not isinstance(answer, Answer):
                raise Suspend(f"waiting for a reviewer to extend the {name} budget")
            extended = answer.choice == "Extend"
            budgets = {**(self.run.budgets or {}), budget: limit * 2} if extended else None
            if budgets:
                Run.objects.filter(pk=self.run.pk).update(budgets=budgets)
                self.run.budgets = budgets
            step_finish(
                step,
                outbox=self.outbox,
                defer=True,
                status=StepStatus.COMPLETED,
                output={"extended": extended, "by": answer.by},
                message=f"{answer.by} {'extended' if extended else 'declined to extend'} the "
                f"{name} budget.",
                event_kind="budget.extended" if extended else "budget.declined",
            )
        if not step.output.get("extended"):
            raise BudgetExceeded(f"{name} budget of {limit} exhausted; extension declined")
        self.run.budgets = {
            **(self.run.budgets or {}),
            budget: max((self.run.budgets or {}).get(budget, 0), limit * 2),
        }

    def _outside_workflow_transactions(self) -> None:
        """Steps commit on their own: a ``ctx`` call inside a transaction the workflow opened
        would have its records rolled back with it."""
        if len(connection.atomic_blocks) > self._atomic_depth:
            raise WorkflowMisuse(
                "ctx calls cannot run inside a transaction the workflow opened "
                "(transaction.atomic): each step commits on its own"
            )

    def _start(
        self,
        seq: int,
        kind: str,
        name: str,
        input: dict,
        step: Step | None,
        *,
        message: str = "",
        events: list[tuple[str, str, dict]] | None = None,
        **kw,
    ) -> Step:
        if step is not None and step.status == StepStatus.STARTED:
            self._give_up_if_cut_short(step)
        if step is None:
            attempt = 1
        elif step.status == StepStatus.WAITING:
            attempt = step.attempt  # resuming the same attempt
        else:
            attempt = step.attempt + 1
        events = list(events or [])
        if message:
            events.insert(0, (f"{kind}.started", message, {}))
        started = step_start(
            outbox=self.outbox,
            lease=self._lease,
            seq=seq,
            kind=kind,
            name=name,
            input=input,
            attempt=attempt,
            existing=step,
            events=events,
            **kw,
        )
        self._steps[seq] = started
        return started

    def _give_up_if_cut_short(self, step: Step) -> None:
        """A step whose attempts keep being cut short (its worker killed, the database failing
        under it) without one failure or success recorded is not tried forever."""
        cut_short = step.attempt - step.failures
        if cut_short < CUT_SHORT_LIMIT:
            return
        message = f"{step.name} was cut short {cut_short} times (crashes or database outages)"
        self._fail(step, StepFailed(message))

    def _fail(self, step: Step, error: Exception, **fields) -> NoReturn:
        """Record the step failed, saying ``error`` (its text, its type), and raise ``error``
        into the workflow. ``fields`` go to ``step_finish`` (a message of its own, an event
        kind, the verdict...)."""
        step_finish(
            step,
            outbox=self.outbox,
            status=StepStatus.FAILED,
            error=str(error),
            error_type=type(error).__name__,
            **{"message": str(error), **fields},
        )
        self._account(0, 0)
        raise error

    def _account(self, tokens: int, cost: float) -> None:
        self._tokens += tokens
        self._cost += cost
        self._counted += 1

    def _execute(
        self,
        step: Step,
        call: Callable[[], Any],
        *,
        timeout: float,
        verdict: dict | None = None,
    ) -> Any:
        """Run ``call`` once for this attempt; record the result, a retry, or a final failure
        (with the gate's ``verdict`` that let it run, if any)."""
        policy = RETRY_POLICIES[step.kind]
        keeper = LeaseKeeper(self.run.pk, self._lease)
        started = time.monotonic()
        try:
            result = call_with_timeout(call, timeout, what=step.name, keeper=keeper)
            _recordable(result)
        except Exception as exc:
            if is_outage(exc):
                raise  # the database failed under the call: not the tool's failure
            error = exc
        else:
            faults.point(faults.EXECUTED, self.run.pk)
            return result, int((time.monotonic() - started) * 1000)
        latency = int((time.monotonic() - started) * 1000)
        message = f"{type(error).__name__}: {error}"
        try:
            self._fail_attempt(step, error, message, latency, policy, verdict)
        finally:
            # A call that overran and still runs would run beside the step's next attempt:
            # once the attempt is recorded, and before the lease is given back, end it with
            # the process, the only way to stop a call in Python.
            if isinstance(error, CallAbandoned) and not error.ended(
                grace=OVERRUN_GRACE_SECONDS, keeper=keeper
            ):
                keeper.stop(f"{step.name} of run {self.run.pk} overran its timeout")

    def _fail_attempt(self, step, error, message, latency, policy, verdict) -> None:
        """Record a retry (and raise ``Suspend`` until it is due) or the step's failure (and
        raise ``StepFailed``)."""
        if is_retryable(error) and step.failures + 1 < policy.attempts:
            retry_at = timezone.now() + timedelta(seconds=policy.backoff(step.attempt))
            step_finish(
                step,
                outbox=self.outbox,
                status=StepStatus.RETRYING,
                error=message,
                error_type=type(error).__name__,
                latency_ms=latency,
                verdict=verdict,
                next_attempt_at=retry_at,
                message=f"Attempt {step.attempt} failed ({message}); retrying.",
                event_kind=f"{step.kind}.retrying",
            )
            raise Suspend(f"retrying {step.name}", wake_at=retry_at)
        self._fail(
            step,
            StepFailed(message, error_type=type(error).__name__),
            latency_ms=latency,
            verdict=verdict,
            message=f"{step.name} failed after {step.failures + 1} attempt(s): {message}",
        )

    def _wait_for_retry(self, step: Step | None) -> None:
        due = step.next_attempt_at if step is not None else None
        if step is not None and step.status == StepStatus.RETRYING and due and due > timezone.now():
            raise Suspend(f"retrying {step.name}", wake_at=due)

    # --- the authoring API ------------------------------------------------------------------

    @_interruptible
    def now(self) -> datetime:
        seq, step = self._next(StepKind.NOW, "now")
        if step is not None and step.status in DONE:
            return datetime.fromisoformat(self._replay(step))
        value = timezone.now()
        started = self._start(seq, StepKind.NOW, "now", {}, step)
        step_finish(
            started,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output=value.isoformat(),
        )
        self._account(0, 0)
        return value

    @_interruptible
    def uuid(self) -> str:
        seq, step = self._next(StepKind.UUID, "uuid")
        if step is not None and step.status in DONE:
            return self._replay(step)
        value = str(uuid.uuid4())
        started = self._start(seq, StepKind.UUID, "uuid", {}, step)
        step_finish(
            started, outbox=self.outbox, defer=True, status=StepStatus.COMPLETED, output=value
        )
        self._account(0, 0)
        return value

    @_interruptible
    def sleep(self, seconds: float) -> None:
        """A durable sleep: the run frees its worker and beat wakes it when the time comes."""
        seq, step = self._next(StepKind.SLEEP, f"sleep {seconds:g}s")
        if step is not None and step.status in DONE:
            self._replay(step)
            return
        if step is None:
            self._before_new_call(seq)
            wake_at = timezone.now() + timedelta(seconds=seconds)
            step = self._start(
                seq,
                StepKind.SLEEP,
                f"sleep {seconds:g}s",
                {"seconds": seconds, "wake_at": wake_at.isoformat()},
                None,
                status=StepStatus.WAITING,
                message=f"Sleeping {seconds:g}s until {wake_at:%H:%M:%S} UTC.",
            )
        wake_at = datetime.fromisoformat(step.input["wake_at"])
        if timezone.now() < wake_at:
            raise Suspend(f"sleeping until {wake_at.isoformat()}", wake_at=wake_at)
        step_finish(
            step,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output={"woke_at": timezone.now().isoformat()},
        )
        self._account(0, 0)

    @_interruptible
    def check(self, name: str, passed: bool, *, detail: str = "", continue_on_fail: bool = False):
        """A recorded validation; a failed check raises ``CheckFailed`` unless told to continue."""
        seq, step = self._next(StepKind.CHECK, name)
        if step is not None and step.status in DONE:
            return self._replay(step)["passed"]
        self._before_new_call(seq)
        started = self._start(seq, StepKind.CHECK, name, {"detail": detail}, step)
        verdict = "passed" if passed else "failed"
        output = {"passed": bool(passed), "detail": detail}
        if passed or continue_on_fail:
            step_finish(
                started,
                outbox=self.outbox,
                defer=True,
                status=StepStatus.COMPLETED,
                output=output,
                message=f"Check {name!r} {verdict}. {detail}".strip(),
                event_kind=f"check.{verdict}",
            )
            self._account(0, 0)
            return bool(passed)
        self._fail(
            started,
            CheckFailed(f"check {name!r} failed: {detail}".strip(": ")),
            output=output,
            message=f"Check {name!r} failed. {detail}".strip(),
            event_kind="check.failed",
        )

    @_interruptible
    def retrieve(self, query: str, *, k: int = 3, source: str | None = None) -> list[dict]:
        """Search the document store. Snippets are recorded as the step's context and labelled
        ``untrusted_input``: they are text from outside that may carry instructions."""
        from orchestration.retrieval.search import retrieve

        name = f"retrieve {source or 'all'}"
        seq, step = self._next(StepKind.RETRIEVE, name)
        if step is not None and step.status in DONE:
            return self._replay(step)
        self._wait_for_retry(step)
        self._before_new_call(seq)
        started = self._start(
            seq, StepKind.RETRIEVE, name, {"query": query, "k": k, "source": source}, step
        )
        snippets, latency = self._execute(
            started,
            lambda: [snippet.to_record() for snippet in retrieve(query, k=k, source=source)],
            timeout=RETRY_POLICIES[StepKind.RETRIEVE].timeout,
        )
        labels = ["untrusted_input"]
        titles = ", ".join(s["title"] for s in snippets) or "nothing"
        step_finish(
            started,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output=snippets,
            labels=labels,
            latency_ms=latency,
            message=f"Retrieved {len(snippets)} snippet(s) for {query!r}: {titles}.",
        )
        self._account(0, 0)
        self.labels.update(labels)
        return snippets

    @_interruptible
    def llm(
        self,
        messages: list[dict],
        *,
        tools: list | None = None,
        output_schema: dict | None = None,
        name: str = "model call",
        provider: str | None = None,
        model: str | None = None,
    ) -> Any:
        """Call the run's model. Returns the parsed output when ``output_schema`` is given,
        else ``{"text": ..., "tool_calls": [...]}``."""
        from orchestration.providers import get_provider

        agent = self.run.agent
        provider_name = provider or (agent.provider if agent else "scripted")
        model_name = model or (agent.model if agent else "scripted-1")
        seq, step = self._next(StepKind.LLM, name)
        if step is not None and step.status in DONE:
            return _llm_result(self._replay(step), output_schema)
        self._wait_for_retry(step)
        self._before_new_call(seq)
        tool_specs = [_spec(t) for t in tools or []]
        started = self._start(
            seq,
            StepKind.LLM,
            name,
            {
                "provider": provider_name,
                "model": model_name,
                "messages": messages,
                "tools": [t.name for t in tool_specs],
                "output_schema": output_schema,
            },
            step,
        )
        timeout = RETRY_POLICIES[StepKind.LLM].timeout
        record, _ = self._execute(
            started,
            lambda: (
                get_provider(provider_name)
                .complete(
                    model=model_name,
                    messages=messages,
                    tools=tool_specs or None,
                    output_schema=output_schema,
                    timeout=timeout,
                )
                .to_record()
            ),
            timeout=timeout + 5,
        )
        tokens = record["input_tokens"] + record["output_tokens"]
        summary = str(record["text"]).strip() or ", ".join(
            f"calls {call['name']}" for call in record["tool_calls"]
        )
        step_finish(
            started,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output=record,
            tokens=tokens,
            cost_usd=record["cost_usd"],
            latency_ms=record["latency_ms"],
            message=summary[:2000],
            event_kind="llm.completed",
            event_data={"model": record["model"], "tokens": tokens},
        )
        self._account(tokens, record["cost_usd"])
        return _llm_result(record, output_schema)

    def tool(self, name: str, /, _reasoning: str = "", _confidence: float | None = None, **args):
        """Call a tool through the gate. Raises ``ActionDenied`` or ``ActionRejected`` (with the
        reason) into the workflow, which may catch them and try another way."""
        return self.act(name, args, reasoning=_reasoning, confidence=_confidence)

    @_interruptible
    def act(self, name: str, args: Any, *, reasoning: str = "", confidence: Any = None) -> Any:
        """A tool call with its arguments as a value: ``ctx.tool``, and each call a model
        returns inside ``ctx.agent`` (where anything may come back).

        The arguments are canonicalised once (trimmed, NFC, integral numbers as integers);
        the gate decides on those, the step records them, and exactly what the gate decided
        on executes. A tool not usable here, or arguments without a canonical form or outside
        the tool's schema, are refused before the gate and recorded as a refused step."""
        seq, step = self._next(StepKind.TOOL, name)
        agent = self.acting_agent.name if self.acting_agent else None
        call, malformed = _call_input(args, reasoning, confidence, agent=agent)
        replayed = step is not None and step.status in DONE
        if not malformed:
            self._count_call(name, call["args"], replayed=replayed)
        if replayed:
            return self._replay(step)
        self._wait_for_retry(step)
        self._before_new_call(seq)
        definition = TOOLS.get(name)
        if definition is None and self._acting is None:
            get_tool(name)  # an unknown name in workflow code is a programming error
        args = call["args"]
        problem = self._unusable(name, definition) or (
            InvalidArguments(f"{name}: {malformed}") if malformed else None
        )
        problem = problem or _schema_problem(definition, args)
        # The step is marked started before the gate reviews it, committing with it whatever
        # the outbox holds: the gate reads the run from the database (taint by value, totals)
        # and sees everything the run produced, and this action as executing. That serialises
        # concurrent reviews of one total: each review reads after its own start committed, so
        # of two overlapping reviews the later read sees the other's started step, and a pair
        # of actions that together pass a limit can never both be allowed on totals that miss
        # the other (a started step that is then refused or waits stops counting: that errs
        # towards asking). The verdict is recorded with the step's finish. A crash in between
        # leaves a started step, re-attempted and reviewed again (the gate's review is
        # idempotent per run and step).
        started = self._start(
            seq, StepKind.TOOL, name, call, step, message=reasoning and f"Reasoning: {reasoning}"
        )
        if problem is not None:
            self._refuse(started, problem)
        action = Action(
            tool=name,
            args=args,
            run_id=self.run.pk,
            step_seq=seq,
            agent=agent,
            reasoning=reasoning,
            confidence=confidence,
            labels=tuple(sorted(self.labels)),
        )
        verdict = self._gate.review(action, run_id=self.run.pk, step_seq=seq)
        record = verdict.to_record()
        self.outbox.events.append(
            Event(
                run_id=self.run.pk,
                step_seq=seq,
                kind=f"verdict.{verdict.outcome}",
                message=_verdict_message(name, verdict),
                data={"verdict": record},
            )
        )
        if verdict.outcome == "deny":
            self._refuse(started, ActionDenied(verdict.reason or "denied by policy"), record)
        if verdict.outcome == "rejected":
            self._refuse(started, ActionRejected(verdict.reason or "rejected"), record)
        if verdict.outcome == "halted":
            raise Halted(verdict.reason)
        if verdict.outcome == "pending":
            step_finish(started, outbox=self.outbox, status=StepStatus.WAITING, verdict=record)
            raise Suspend(f"waiting for a decision on {name}")
        # Exactly what the gate decided on: its arguments (an approved edit), else ours.
        execute_args = args if verdict.args is None else verdict.args
        if execute_args != args:
            problem = _schema_problem(definition, execute_args)
            if problem is not None:
                self._refuse(started, problem, record)
        # The gate's decision committed; a halt may have committed since: fence before acting.
        lease_fence(run_id=self.run.pk, lease=self._lease)
        output, latency = self._execute(
            started,
            lambda: definition.fn(**execute_args, idempotency_key=started.idempotency_key),
            timeout=definition.timeout,
            verdict=record,
        )
        # What its result carries as the gate knows the tool: an admin's edit of the tool's
        # labels taints the run exactly as the policy that decided says.
        labels = sorted(
            set(definition.labels_produced if verdict.labels is None else verdict.labels)
        )
        step_finish(
            started,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output=output,
            cost_usd=float(definition.cost_per_call),
            latency_ms=latency,
            labels=labels,
            verdict=record,
            message=f"{name} returned {canonical_json(output)[:500]}",
            event_kind="tool.completed",
        )
        self._account(0, float(definition.cost_per_call))
        self.labels.update(labels)
        return output

    @_interruptible
    def ask_human(
        self,
        question: str,
        *,
        choices: list[str] | tuple[str, ...] = (),
        about: dict[str, Any] | None = None,
    ) -> str:
        """Ask reviewers through the gate; the run waits durably for the answer (a choice).
        ``about`` names, from the workflow's own code, what the answer decides (e.g. the guest a
        hotel pick is for): policies bind the answer to it (``run.answers``), never to the
        question's text, which may quote a model."""
        seq, step = self._next(StepKind.ASK_HUMAN, "ask human")
        if step is not None and step.status in DONE:
            return self._replay(step)["choice"]
        if step is None:
            self._before_new_call(seq)
        started = self._start(
            seq,
            StepKind.ASK_HUMAN,
            "ask human",
            {"question": question, "choices": list(choices), "about": about or {}},
            step,
            status=StepStatus.WAITING,
            message="" if step else f"Asked a human: {question}",
        )
        answer = self._gate.ask_human(
            Question(text=question, choices=tuple(choices), context=canonical_args(about or {})),
            run_id=self.run.pk,
            step_seq=seq,
        )
        if not isinstance(answer, Answer):
            raise Suspend("waiting for an answer")
        step_finish(
            started,
            outbox=self.outbox,
            defer=True,
            status=StepStatus.COMPLETED,
            output={"choice": answer.choice, "by": answer.by, "comment": answer.comment},
            message=f"{answer.by} answered: {answer.choice}",
            event_kind="ask_human.answered",
        )
        self._account(0, 0)
        return answer.choice

    @_interruptible
    def handoff(self, agent, *, goal: str, context: dict | None = None) -> Any:
        """Hand a goal to another agent in a child run; its usable tools are the intersection
        of this run's and the callee's. This run waits durably for the child's result."""
        callee = _agent(agent)
        name = f"handoff to {callee.name}"
        seq, step = self._next(StepKind.HANDOFF, name)
        if step is not None and step.status in DONE:
            return self._replay(step)
        if step is None:
            self._before_new_call(seq)
            step = self._start(
                seq,
                StepKind.HANDOFF,
                name,
                {"goal": goal, "context": context or {}},
                None,
                status=StepStatus.WAITING,
                message=f"Handed off to {callee.name}: {goal}",
            )
        child = handoffs.run_start_child(
            parent=self.run,
            step_seq=seq,
            agent=callee,
            goal=goal,
            context=context or {},
            caller_tools=self.usable_tools(),
        )
        if not child.is_final:
            raise Suspend(f"waiting for child run {child.pk}")
        if child.status == "completed":
            # The child's result may carry anything its run (or theirs) read: the step's labels
            # are the labels of whatever produced its output.
            labels = subtree_labels(child.pk)
            step_finish(
                step,
                outbox=self.outbox,
                defer=True,
                status=StepStatus.COMPLETED,
                output=child.result,
                labels=labels,
                message=f"{callee.name} finished (run {child.pk}).",
                event_kind="handoff.completed",
            )
            self._account(0, 0)
            self.labels.update(labels)
            return child.result
        error = f"child run {child.pk} {child.status}: {child.error or child.halt_reason}"
        self._fail(step, StepFailed(error), event_kind="handoff.failed")

    @_interruptible
    def agent(
        self,
        agent,
        *,
        goal: str,
        tools: list[str] | None = None,
        max_steps: int = 8,
        context: dict | None = None,
    ) -> str:
        """A plan-act-observe loop on the agent's model: every model turn and every tool call
        is its own step; a denied or rejected action is the agent's observation.

        For the loop's duration ``agent`` is the acting agent: the gate evaluates its actions
        with its grants, ceiling, rules and thresholds, and the model may use only the tools
        offered to it: ``tools`` (default: its ceiling) within its ceiling and within what
        may be used here (the run's limit, or an enclosing loop's offer)."""
        from orchestration.engine.agent_loop import run_agent_loop

        return run_agent_loop(
            self, _agent(agent), goal=goal, tools=tools, max_steps=max_steps, context=context
        )

    @_interruptible
    def progress(self, fraction: float, label: str = "") -> None:
        """Report progress (not a step); written only when the run moves forward."""
        if self.replaying:
            return
        Run.objects.filter(pk=self.run.pk).update(
            progress=max(0.0, min(1.0, fraction)), progress_label=label[:200]
        )

    # --- helpers ------------------------------------------------------------------------------

    @property
    def acting_agent(self) -> Agent | None:
        """The agent acting now: inside ``ctx.agent(...)`` that loop's agent, else the run's."""
        return self._acting.agent if self._acting is not None else self.run.agent

    @contextmanager
    def acting_as(self, agent: Agent, tools: list[str] | None = None) -> Iterator[list[str]]:
        """Act as ``agent`` until the block ends (by an exception too; then whoever acted before
        acts again). Yields the tools offered: ``tools`` (default: its ceiling) within its
        ceiling and within what may be used here, which is all that may be used meanwhile."""
        ceiling = set(agent.tools.values_list("name", flat=True))
        usable = self.usable_tools()
        wanted = sorted(ceiling) if tools is None else tools
        offered = [t for t in wanted if t in ceiling and t in usable]
        previous = self._acting
        self._acting = Acting(agent, frozenset(offered))
        try:
            yield offered
        finally:
            self._acting = previous

    def usable_tools(self) -> frozenset[str]:
        """The tools an action may use here: inside ``ctx.agent(...)`` the tools that loop
        offered its model (already within the run's limit and the acting agent's ceiling),
        else the run's limit."""
        return self._acting.offered if self._acting is not None else self.run_limit()

    def run_limit(self) -> frozenset[str]:
        """All this run may use: the tools handed to it (a handoff), else its agent's ceiling,
        else what its workflow declares. Read once per slice; the gate checks again live."""
        if self._limit is None:
            if self.run.allowed_tools is not None:
                self._limit = frozenset(self.run.allowed_tools)
            elif self.run.agent is not None:
                self._limit = frozenset(self.run.agent.tools.values_list("name", flat=True))
            else:
                definition = get_workflow(self.run.workflow, self.run.workflow_version)
                self._limit = definition.declared_tools()
        return self._limit

    def _unusable(self, name: str, definition) -> WorkflowError | None:
        if self._acting is not None:
            if name in self._acting.offered and definition is not None:
                return None
            offered = ", ".join(sorted(self._acting.offered)) or "none"
            return ToolUnavailable(f"tool {name!r} was not offered (offered: {offered})")
        if name not in self.run_limit():
            return ToolUnavailable(f"tool {name} is not available to this run")
        return None

    def _refuse(self, step: Step, error: Exception, verdict: dict | None = None) -> NoReturn:
        self._fail(
            step,
            error,
            verdict=verdict,
            message=f"{step.name}: {error}",
            event_kind=f"tool.{type(error).__name__}",
        )

    def _count_call(self, name: str, args: dict, *, replayed: bool) -> None:
        key = name + ":" + sha256_hex(canonical_json(args))
        self._calls[key] += 1
        limit = (self.run.budgets or {}).get("loop_limit")
        if not replayed and limit and self._calls[key] > limit:
            raise BudgetExceeded(
                f"loop detected: {name} called {limit} times with the same arguments"
            )


def _call_input(
    args: Any, reasoning: str, confidence: Any, *, agent: str | None
) -> tuple[dict, str]:
    """A tool step's input: the canonical arguments, the reasoning, the confidence and the agent
    acting. A call without a canonical form is recorded without its arguments, with what is
    wrong."""
    refused = {"args": None, "reasoning": "", "confidence": None, "agent": agent}
    if not isinstance(args, dict):
        return refused, "arguments must be an object"
    try:
        call = {"args": canonical_args(args), "reasoning": reasoning, "confidence": confidence}
        canonical_json(call, path="call")
    except CanonicalError as exc:
        return refused, str(exc)
    return {**call, "agent": agent}, ""


def _schema_problem(definition, args: dict) -> InvalidArguments | None:
    error = jsonschema.exceptions.best_match(definition.validator.iter_errors(args))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "arguments"
    return InvalidArguments(f"{definition.name} {where}: {error.message}")


def _recordable(result: Any) -> None:
    """What a model, a tool or a search returns is recorded only if it has a canonical JSON
    form: no NaN, infinity or NUL, which the database would refuse (or store as a poison)."""
    try:
        canonical_json(result, path="result")
    except CanonicalError as exc:
        raise NonRetryable(f"the result cannot be recorded: {exc}") from None


def _spec(tool_name_or_spec):
    from orchestration.providers import ToolSpec

    if isinstance(tool_name_or_spec, ToolSpec):
        return tool_name_or_spec
    definition = get_tool(tool_name_or_spec)
    return ToolSpec(
        name=definition.name, description=definition.description, parameters=definition.schema
    )


def _llm_result(record: dict, output_schema: dict | None) -> Any:
    if output_schema is not None:
        return record.get("parsed")
    return {"text": record.get("text", ""), "tool_calls": record.get("tool_calls", [])}


def _agent(agent):
    return agent if isinstance(agent, Agent) else Agent.objects.get(name=agent)


def _verdict_message(tool: str, verdict) -> str:
    reason = f": {verdict.reason}" if verdict.reason else ""
    return f"Gate {verdict.outcome} {tool}{reason}"
