#!/bin/sh
# Build machine: make, sign and publish one version of a voice for the fleet.
#   ./publish.sh en_US-lessac-medium.onnx en_US-lessac-medium 3
#   ROLLOUT=0.05 ./publish.sh ...   # to 5 % of the boxes first (then: ttsd models rollout ... --sign-key)
# Needs: ttsd with the signing extra, the fleet's private key, and rclone configured for the
# mirror's bucket (or any other way to copy $MIRROR_DIR to the web server).
set -eu
onnx=$1 name=$2 version=$3
key=${FLEET_KEY:-/secure/fleet.key}
mirror_dir=${MIRROR_DIR:-/srv/ttsd-mirror}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ttsd models import-piper "$onnx" "$work/$name-$version" --name "$name" --version "$version"
ttsd models sign "$work/$name-$version" --key "$key"
ttsd models verify "$work/$name-$version" --trusted-keys "${TRUSTED_KEYS:-/etc/ttsd/trusted}"
ttsd models publish "$work/$name-$version" "$mirror_dir" --rollout "${ROLLOUT:-1}" --sign-key "$key"
# (publish's lock file stays on the build machine)
rclone sync "$mirror_dir" "${RCLONE_REMOTE:-mirror:ttsd-voices}" --exclude .ttsd-index.lock   # or: rsync -a --exclude .ttsd-index.lock "$mirror_dir"/ web:/var/www/voices/
