#!/bin/sh
# Drop requests into ttsd's spool and wait for the results.
#   ttsd serve --spool /var/spool/ttsd &      (or SPOOL=... for another directory)
#   sh examples/spool.sh "Text to speak."
set -eu
SPOOL=${SPOOL:-/var/spool/ttsd}
ID=${ID:-req-$(date +%s)-$$}

# Publish atomically: write a dot-file, then rename it into incoming/.
printf '%s' "${1:-Hello from the spool.}" > "$SPOOL/incoming/.$ID.txt.tmp"
mv "$SPOOL/incoming/.$ID.txt.tmp" "$SPOOL/incoming/$ID.txt"

# A JSON request takes the same fields as POST /v1/synthesize:
#   {"text": "...", "voice": "en_US-joe-medium", "format": "flac", "speed": 1.2}

# out/ID.json appears last and marks completion; failed/ID.error.json says why not.
while [ ! -e "$SPOOL/out/$ID.json" ] && [ ! -e "$SPOOL/failed/$ID.error.json" ]; do sleep 0.2; done
if [ -e "$SPOOL/out/$ID.json" ]; then
    cat "$SPOOL/out/$ID.json"
    echo "audio: $SPOOL/out/$ID.wav"
else
    cat "$SPOOL/failed/$ID.error.json" >&2
    exit 1
fi
