"""A scriptable gate for the engine's tests: verdicts and answers are set per tool or run."""

from orchestration.gate import Action, Answer, Pending, Question, Verdict


class ScriptedGate:
    verdicts: dict[str, Verdict] = {}  # tool name -> verdict (default: allow)
    answers: dict[int, Answer] = {}  # run id -> answer (default: pending)
    reviewed: list[Action] = []
    cancelled: list[int] = []

    @classmethod
    def reset(cls) -> None:
        cls.verdicts, cls.answers, cls.reviewed, cls.cancelled = {}, {}, [], []

    def review(self, action: Action, *, run_id: int, step_seq: int) -> Verdict:
        self.reviewed.append(action)
        verdict = self.verdicts.get(action.tool)
        return verdict or Verdict("allow", action_hash=action.hash)

    def ask_human(self, question: Question, *, run_id: int, step_seq: int):
        return self.answers.get(run_id) or Pending()

    def cancel_run(self, run_id: int, *, by: str, reason: str) -> None:
        self.cancelled.append(run_id)
