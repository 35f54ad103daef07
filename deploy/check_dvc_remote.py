"""Scrub an S3 DVC remote: recompute every object's MD5 and report those that do not match.

Why: DVC names each object in a remote by the MD5 of its content (``files/md5/<2>/<30>``, a
directory listing with a ``.dir`` suffix) but, by default, trusts what it downloads: a corrupted or
tampered object is checked out as if it were the data (``remote.<name>.verify`` is false). With
``verify = true`` (what docs/deploy.md sets) ``dvc pull`` refuses such an object, but only when
someone pulls it; this scrub finds it first, for every object, without a DVC checkout of each
revision. It reads the remote with the same S3 settings DVC uses (``url`` and ``endpointurl`` of
the remote in the repository's DVC config; credentials from the usual AWS chain, e.g.
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).

    python deploy/check_dvc_remote.py                 # the default remote of the repo in cwd
    python deploy/check_dvc_remote.py --remote storage --repo /path/to/checkout
    python deploy/check_dvc_remote.py --url s3://bucket/prefix --endpoint-url http://...

Exit status: 0 every object matches, 1 some do not (each is printed), 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

OBJECT = re.compile(r"files/md5/([0-9a-f]{2})/([0-9a-f]{30})(\.dir)?$")


def remote_settings(repo: Path, name: str | None) -> tuple[str, str | None]:
    """(url, endpointurl) of remote ``name`` (default: the repo's default remote)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        conf = r.config
        name = name or conf["core"].get("remote")
        if not name or name not in conf["remote"]:
            raise ValueError(f"no DVC remote {name!r} in {repo}")
        remote = conf["remote"][name]
        return remote["url"], remote.get("endpointurl")


def objects(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def scrub(url: str, endpoint_url: str | None) -> tuple[int, list[str]]:
    """Number of objects checked and one line per object whose content does not match its name
    (or whose name is not a DVC object name)."""
    import boto3

    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise ValueError(f"{url} is not an s3:// remote")
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    prefix = f"{prefix}/files/md5/" if prefix else "files/md5/"
    client = boto3.client("s3", endpoint_url=endpoint_url)
    checked, bad = 0, []
    for key in objects(client, bucket, prefix):
        checked += 1
        m = OBJECT.search(key)
        if m is None:
            bad.append(f"s3://{bucket}/{key}: not a DVC object name")
            continue
        want = m.group(1) + m.group(2)
        digest = hashlib.md5(usedforsecurity=False)
        for chunk in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
        if digest.hexdigest() != want:
            bad.append(f"s3://{bucket}/{key}: content MD5 {digest.hexdigest()}, name says {want}")
    return checked, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="DVC repository (cwd)")
    ap.add_argument("--remote", help="remote name (default: the repository's default remote)")
    ap.add_argument("--url", help="s3://bucket/prefix instead of a repository's remote")
    ap.add_argument("--endpoint-url", help="S3 endpoint with --url (default: AWS)")
    args = ap.parse_args(argv)
    try:
        if args.url:
            url, endpoint = args.url, args.endpoint_url
        else:
            url, endpoint = remote_settings(args.repo, args.remote)
        checked, bad = scrub(url, endpoint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in bad:
        print(line)
    print(f"{url}: {checked} objects checked, {len(bad)} corrupted")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
