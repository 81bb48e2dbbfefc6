"""A reward function written for TRL / open-r1: conversational completions (lists of messages) and the
`solution` column. rlkit must call it unchanged."""


def accuracy_reward(completions, solution, prompts=None, **kwargs):
    """open-r1's shape: the text is ``completion[0]["content"]``; the prompt is a list of messages."""
    assert prompts is None or all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if f"<answer> {sol} </answer>" in c else 0.0 for c, sol in zip(contents, solution)]
