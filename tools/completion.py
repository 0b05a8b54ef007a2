"""``mexc completion {bash,zsh}``: a shell completion script generated from the parser itself."""

from __future__ import annotations

import argparse


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A completion script generated from the parser itself (commands, options, choices, pass names)."""
    from ..passes import PASSES

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sp in sub.choices.items():
        opts = [o for a in sp._actions for o in a.option_strings]
        choices = {o: list(a.choices) for a in sp._actions if a.choices for o in a.option_strings}
        if name == "passes":
            opts += sorted(PASSES)
        prev = "".join(f'        {o}) COMPREPLY=($(compgen -W "{" ".join(map(str, c))}" -- "$cur")); return;;\n'
                       for o, c in choices.items())
        cases.append(f'    {name})\n      case "$prev" in\n{prev}      esac\n'
                     f'      COMPREPLY=($(compgen -W "{" ".join(opts)}" -- "$cur") $(compgen -f -- "$cur"));;\n')
    body = (
        "_mexc() {\n  local cur prev cmd\n  cur=\"${COMP_WORDS[COMP_CWORD]}\"\n  prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n"
        "  cmd=\"${COMP_WORDS[1]}\"\n  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
        f"    COMPREPLY=($(compgen -W \"{' '.join(sub.choices)} --help --debug\" -- \"$cur\")); return\n  fi\n"
        "  case \"$cmd\" in\n" + "".join(cases) + "  esac\n}\ncomplete -F _mexc mexc\n")
    if shell == "zsh":
        return "#compdef mexc\nautoload -U bashcompinit && bashcompinit\n" + body
    return body
