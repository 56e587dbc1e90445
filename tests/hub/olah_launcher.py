"""Starts olah (a self-hosted Hub mirror) serving local git repositories over the Hub's HTTP API, for tests.

Usage: `python olah_launcher.py --config olah.toml --host 127.0.0.1 --port PORT` (olah's own command line).

One fix over olah: for a file missing from a local mirror, olah falls back to its (unreachable, offline) upstream
and answers 401 RepoNotFound, where the Hub answers 404 EntryNotFound. Clients probe for optional files
(`pipeline()` asks for `adapter_config.json`, `datasets` for `README.md` siblings) and give up on a 401, so this
launcher wraps olah's two file routes and turns exactly that answer, for a repository it mirrors, into the Hub's
404 before starting olah's own command line.
"""

import olah.server
import olah.server_file_routes
from olah.errors import error_entry_not_found
from olah.server_access import build_repo_ref
from olah.server_mirror import has_local_mirror


def entry_not_found_for_mirrored_repos(route):
    async def wrapped(app, repo_type, org, repo, commit, file_path, request):
        response = await route(app, repo_type, org, repo, commit, file_path, request)
        missing = response.status_code == 401 and response.headers.get("x-error-code") == "RepoNotFound"
        if missing and has_local_mirror(app, build_repo_ref(repo_type, org, repo)):
            return error_entry_not_found()
        return response

    return wrapped


for name in ("file_head_common", "file_get_common"):
    setattr(olah.server_file_routes, name, entry_not_found_for_mirrored_repos(getattr(olah.server_file_routes, name)))

if __name__ == "__main__":
    olah.server.cli()
