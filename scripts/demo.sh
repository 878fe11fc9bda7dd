#!/usr/bin/env bash
# The end-to-end demo of the bridge. Not yet: the bridge daemon has not landed.
echo "demo: not yet. The bridge daemon is not built yet; see the README's status table." >&2
exit 1
