#!/bin/sh
# Drop a request into ttsd's spool and wait for the result.
#   ttsd serve --spool /var/spool/ttsd &      (TTSD_SPOOL, or SPOOL here, for another directory)
#   sh examples/spool.sh "Text to speak."
set -eu
SPOOL=${SPOOL:-${TTSD_SPOOL:-/var/spool/ttsd}}
ID=${ID:-req-$(date +%s)-$$}
WAIT=${WAIT:-300}  # seconds to wait for the answer

if [ ! -d "$SPOOL/incoming" ]; then
    echo "no spool at $SPOOL: start 'ttsd serve --spool $SPOOL', or set TTSD_SPOOL" >&2
    exit 2
fi

# Publish atomically: write a dot-file, then rename it into incoming/.
printf '%s' "${1:-Hello from the spool.}" > "$SPOOL/incoming/.$ID.txt.tmp"
mv "$SPOOL/incoming/.$ID.txt.tmp" "$SPOOL/incoming/$ID.txt"

# A JSON request takes the same fields as POST /v1/synthesize:
#   {"text": "...", "voice": "en_US-joe-medium", "format": "flac", "speed": 1.2}

# out/ID.json appears last and marks completion; failed/ID.error.json says why not.
waited=0
while [ ! -e "$SPOOL/out/$ID.json" ] && [ ! -e "$SPOOL/failed/$ID.error.json" ]; do
    if [ "$waited" -ge "$((WAIT * 5))" ]; then
        echo "no answer for $ID in $WAIT s: is a daemon serving $SPOOL? (the request stays in $SPOOL/incoming)" >&2
        exit 3
    fi
    sleep 0.2
    waited=$((waited + 1))
done
if [ -e "$SPOOL/out/$ID.json" ]; then
    cat "$SPOOL/out/$ID.json"
    for audio in "$SPOOL/out/$ID".*; do
        [ "$audio" = "$SPOOL/out/$ID.json" ] || echo "audio: $audio"
    done
else
    cat "$SPOOL/failed/$ID.error.json" >&2
    exit 1
fi
