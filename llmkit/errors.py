"""One exception type for every user-facing failure.

The CLI catches `LlmkitError`, prints its message on one line and exits non-zero;
anything else escaping is a bug in llmkit, not in the user's input.
"""


class LlmkitError(Exception):
    """A problem with the user's input (file, config, argument) described in one line."""
