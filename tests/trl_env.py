"""A TRL environment_factory class, written to TRL's documented contract (reset, public methods as tools,
get_reward), as a TRL user's module holds it: it imports nothing from rlkit."""


class CounterEnv:
    """Counts up from the row's start; the reward is whether the model stopped at the target."""

    def reset(self, **kwargs) -> str | None:
        self.value = int(kwargs.get("start", 0))
        self.target = int(kwargs.get("target", 3))
        return f" (start at {self.value})" if kwargs.get("announce") else None

    def increment(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return str(self.value)

    def get_reward(self) -> float:
        return 1.0 if self.value == self.target else 0.0


class Chatty:
    """An environment that answers the model's plain turns (rlkit's respond hook) twice, then ends."""

    def reset(self, **kwargs) -> None:
        self.replies = 0

    def respond(self, text: str) -> str | None:
        self.replies += 1
        return "go on" if self.replies <= 1 else None


class NoReset:
    def increment(self, by: int) -> str:
        """Add.

        Args:
            by: How much.
        """
        return str(by)


class Broken:
    def __init__(self):
        raise RuntimeError("no database")

    def reset(self, **kwargs):
        return None


class FailsLater:
    """Builds fine (the probe before training), then its reset raises on a row it cannot handle."""

    def reset(self, **kwargs):
        if kwargs.get("answer") is not None:
            raise KeyError("start")
        return None
