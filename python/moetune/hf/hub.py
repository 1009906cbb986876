"""Models named by Hugging Face Hub id (`Qwen/Qwen3-30B-A3B`) as well as by folder.

`resolve_model(name)` returns a local checkpoint folder: `name` itself when it is a folder,
else the Hub snapshot of the repo `name`, through `huggingface_hub.snapshot_download`: read from
the hub client's local cache (`HF_HUB_CACHE` / `HF_HOME`, as every HF tool shares it) when it is
there, downloaded otherwise; with `HF_HUB_OFFLINE=1` only the cache is used. The hub client
reads those variables itself; moetune passes nothing but the repo id and revision. Only what
loading needs is fetched: config / tokenizer / index files and safetensors shards (never
PyTorch `.bin` or `original/` duplicates). The folder then loads with the same streaming load
as any local folder (moetune.load_model).

Errors are `HubError`s with one line saying what to do (not in the cache while offline, no such
repo, gated, not a Hub id and not a folder either).
"""

from __future__ import annotations

import os
import re

# org/name as the Hub spells repo ids (letters, digits, -, _, .), with an optional @revision.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# What loading reads; weights only as safetensors (a .bin-only repo then fails the checkpoint
# check with its own message: its index json comes down, its weights do not).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
IGNORE_PATTERNS = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.msgpack", "*.h5"]


class HubError(ValueError):
    """A model name that is neither a local folder nor a Hub repo moetune can get."""


def is_hub_id(name: str) -> bool:
    """True for `org/name` or `org/name@revision` that is not an existing path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name) and ".." not in name


def resolve_model(name) -> str:
    """A local folder for `name` (a folder, or a Hub id resolved through huggingface_hub)."""
    name = os.fspath(name)
    if os.path.isdir(name):
        return name
    m = _HUB_ID.match(name)
    if m is None or not is_hub_id(name):
        raise HubError(f"{name!r} is not a folder (a local HF checkpoint) nor a Hub id (org/name)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise HubError(
            f"{name!r} is not a local folder, and huggingface_hub (pip install huggingface_hub) is not installed to fetch it"
        ) from None
    repo, rev = m.group("repo"), m.group("rev")
    where = f"no local folder {name!r}; Hub repo {repo}" + (f"@{rev}" if rev else "")
    try:
        return snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{where} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                "download it once online (or point HF_HUB_CACHE at the cache holding it)"
            ) from None
        raise HubError(
            f"{where} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached"
        ) from None
    except GatedRepoError:
        raise HubError(f"{where} is gated: accept its licence on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where} does not exist (or is private: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: no such revision") from None
    except HfHubHTTPError as e:
        raise HubError(f"{where}: download failed: {str(e).splitlines()[0]}") from None
