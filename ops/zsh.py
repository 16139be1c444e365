"""`zsh`: zsh as the login shell of the users named, with a sane ~/.zshrc.

The shell is set with shadow's usermod (`--prefix`, as the user op does) to the target's zsh, which
must be listed in /etc/shells (Debian's zsh package puts it there; chsh and some PAM stacks refuse
a shell that is not). zsh itself comes from the distribution: an `update` step with packages
["zsh"] installs it, which is why this op comes after `update` (and after `user`, which makes the
accounts). Both are checked when the step is planned, not when the pipeline is submitted: in a
pipeline the earlier steps have run by then (in a dry run, whose update step installs nothing, zsh is
taken to be where Debian's package puts it).

~/.zshrc is written only where there is none or where it is ours (it carries MARKER); a user's own
file is never touched, and the plan says so. The file is plain zsh: history, completion, emacs keys
and a prompt with user@host and the working directory; no framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from ops.actions import Action, Change, Output, RunCommand
from ops.base import Op, Plan, file_action
from ops.errors import InvalidParams, OpFailed
from ops.params import Kind, Param, Params
from ops.target import Target
from ops.user import ACCOUNT_FILES, USER_NAME, read_account

ZSH_PATHS = ("/usr/bin/zsh", "/bin/zsh")
SHELLS = "/etc/shells"
MARKER = "# Managed by rastosd (op zsh)"
ZSHRC = (
    MARKER
    + """; changes made here are replaced at the next apply.
# To keep a configuration of your own, write it over this file without the line above: rastosd then
# leaves the file alone.

# History: long, shared between sessions, without duplicates or lines that start with a space.
HISTFILE=~/.zsh_history
HISTSIZE=50000
SAVEHIST=50000
setopt EXTENDED_HISTORY SHARE_HISTORY HIST_IGNORE_ALL_DUPS HIST_IGNORE_SPACE HIST_REDUCE_BLANKS

# Emacs key bindings (Ctrl-A, Ctrl-E, Ctrl-R), whatever $EDITOR says.
bindkey -e

# Completion: a menu to move through, upper and lower case alike.
autoload -Uz compinit
compinit -d ~/.zcompdump
zstyle ':completion:*' menu select
zstyle ':completion:*' matcher-list 'm:{a-zA-Z}={A-Za-z}'

setopt AUTO_CD INTERACTIVE_COMMENTS NO_BEEP

# Prompt: user@host:directory, then the exit status of a command that failed.
PROMPT='%F{green}%n@%m%f:%F{blue}%~%f%(?..%F{red} [%?]%f)%# '
"""
)


def check_users(value: list[str]) -> str | None:
    if not value:
        return "must name at least one user"
    duplicates = sorted({name for name in value if value.count(name) > 1})
    return f"names {', '.join(duplicates)} more than once" if duplicates else None


class ZshOp(Op):
    name = "zsh"
    description = "Make zsh the login shell of the users named, with a sane ~/.zshrc (never over a user's own)"
    after = ("user", "update")  # the accounts exist and zsh is installed first
    schema = (
        Param("users", Kind.STRING_LIST, "existing users who get zsh, e.g. [\"alice\"]", required=True,
              pattern=USER_NAME, check=check_users),
        Param("config", Kind.BOOLEAN, f"write ~/.zshrc where there is none or it is ours ({MARKER})",
              default=True),
    )  # fmt: skip

    def plan(self, target: Target, params: Params) -> Plan:
        zsh = installed_zsh(target)
        actions: list[Action] = []
        shells = target.read_text(SHELLS) or ""
        if not any(line.strip() == zsh for line in shells.splitlines()):
            text = shells if shells.endswith("\n") or not shells else shells + "\n"
            actions += file_action(target, SHELLS, text + zsh + "\n")
        kept: list[Action] = []
        for index, name in enumerate(params["users"]):
            account = read_account(target, name)
            if account is None:
                raise InvalidParams(f"params.users[{index}]", f"user {name!r} does not exist on the target (op user)")
            if not is_zsh(target, account.shell):
                argv = ("usermod", "--prefix", "{root}", "--shell", zsh, name)
                actions.append(RunCommand(f"user {name}", argv, ACCOUNT_FILES))
            if params["config"]:
                if not target.is_dir(account.home):
                    problem = f"home {account.home} of {name!r} does not exist: no ~/.zshrc (config false skips it)"
                    raise InvalidParams(f"params.users[{index}]", problem)
                path = f"{account.home}/.zshrc"
                current = target.read_text(path)
                if current is None or MARKER in current:
                    actions += file_action(target, path, ZSHRC, owner=name)
                else:
                    kept.append(KeptFile(path))
        # What is left alone is said only beside a change: said on its own, it would keep the plan from
        # ever being empty.
        return Plan(self.name, tuple(actions + kept) if actions else ())

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = super().verify(target, params)
        shells = (target.read_text(SHELLS) or "").splitlines()
        for name in params["users"]:
            account = read_account(target, name)
            if account is None or not is_zsh(target, account.shell):
                problems.append(f"user {name}: login shell is not zsh")
            elif account.shell not in (line.strip() for line in shells):
                problems.append(f"user {name}: {account.shell} is not listed in {SHELLS}")
        return problems


def installed_zsh(target: Target) -> str:
    for path in ZSH_PATHS:
        if target.has_program(path):
            return path
    if target.simulated:  # a dry run's earlier update step only simulated installing it
        return ZSH_PATHS[0]
    raise OpFailed('zsh is not installed on the target: install it first (op update, packages ["zsh"])')


def is_zsh(target: Target, shell: str) -> bool:
    """Either of zsh's paths: on a merged /usr they are one file."""
    return shell in ZSH_PATHS and target.has_program(shell)


@dataclass(frozen=True)
class KeptFile(Action):
    """A user's own file, left as it is; said in the plan, does nothing."""

    path: str

    def describe(self) -> Change:
        return Change(self.path, "keep", "the user's own file (no rastosd marker): left as it is")

    def execute(self, target: Target, output: Output) -> None:
        output(f"left {self.path} as it is: the user's own")
