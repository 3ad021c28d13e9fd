"""`parley profiles check [FILE]`, and the start-up check `parley serve` and `parley worker`
make: a bad profiles file is one line naming the file, the profile and the key, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.profiles import (
    Assistant,
    ProfileError,
    Profiles,
    from_variables,
    load_profiles,
    profiles_of,
)
from service.settings import EXIT_CONFIG, Settings, settings_or_exit


def add_commands(commands: Any) -> None:
    profiles = commands.add_parser("profiles", help="assistant profiles (PROFILES_FILE)")
    actions = profiles.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="validate a profiles file and list its profiles")
    check.add_argument("file", nargs="?", default=None, help="default: PROFILES_FILE")
    check.set_defaults(func=cmd_check)


def profiles_or_exit(settings: Settings) -> Profiles:
    """`PROFILES_FILE` read and validated, or one line on stderr and exit code 2."""
    try:
        return profiles_of(settings)
    except ProfileError as exc:
        print(f"parley: profiles error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    path = args.file or settings.profiles_file
    if not path:
        print("parley: profiles error: give a FILE or set PROFILES_FILE", file=sys.stderr)
        return EXIT_CONFIG
    try:
        profiles = load_profiles(path, from_variables(settings))
    except ProfileError as exc:
        print(f"parley: profiles error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: {len(profiles.listed)} profile(s)")
    for assistant, addresses in profiles.listed:
        print(f"  {assistant.profile}: {', '.join(addresses)}")
        print(f"    {_describe(assistant)}")
    return 0


def _describe(assistant: Assistant) -> str:
    parts = [f"model {assistant.model}", f"memory {assistant.memory}"]
    if assistant.hours is not None:
        parts.append(f"hours in {assistant.hours.timezone.key}")
    if assistant.greeting:
        parts.append("greeting")
    return ", ".join(parts)
