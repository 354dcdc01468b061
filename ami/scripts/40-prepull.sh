#!/usr/bin/env bash
# Pulls the images named in SPOTRUN_PREPULL_IMAGES (separated by spaces) into the image, so jobs
# that use them start without a pull. A failed pull fails the build: an image that silently
# lacks what it promises is worse than no image.
set -euo pipefail

die() {
  echo "40-prepull: $*" >&2
  exit 1
}

read -r -a images <<<"${SPOTRUN_PREPULL_IMAGES:-}"
if ((${#images[@]} == 0)); then
  echo "40-prepull: no images to pre-pull" >&2
  exit 0
fi

if ! docker info >/dev/null 2>&1; then
  systemctl start docker.service
fi
for image in "${images[@]}"; do
  echo "40-prepull: pulling $image" >&2
  docker pull --quiet "$image" >/dev/null || die "failed to pull $image"
done
