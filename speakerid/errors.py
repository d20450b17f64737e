"""The one exception type for mistakes a user can fix: its message names the file/line/key and the fix."""


class SpeakeridError(Exception):
    """A user-fixable error (bad list line, missing file, corrupt shard, wrong option).

    Front doors print the message without a traceback and exit with status 2.
    """
