# The carried wheels of a checkout for a GPU machine without network, sourced by gpu_check.sh and
# bench_trees.sh: `carry_wheels REPO PYTHON` installs REPO/.whl/*.whl (nvidia-cutlass) into $SITE and
# unpacks REPO/.peerwheels/*.tar.xz (made by peer_wheels.sh) into $SITE-peers, where SITE is
# $GPU_CHECK_SITE (concurrent checks, one per GPU, give themselves their own) or /tmp/fmla_site. It sets
# CARRIED_SITE and CARRIED_PEERS to those folders, or to empty strings where nothing was carried.
carry_wheels() {
  local repo=$1 py=$2 site=${GPU_CHECK_SITE:-/tmp/fmla_site} f
  CARRIED_SITE= CARRIED_PEERS=
  if ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$repo"/.whl/*.whl
    CARRIED_SITE=$site
  fi
  if ls "$repo"/.peerwheels/*.tar.xz >/dev/null 2>&1; then
    mkdir -p "$site-peers" && for f in "$repo"/.peerwheels/*.tar.xz; do tar -C "$site-peers" -xJf "$f"; done
    CARRIED_PEERS=$site-peers
  fi
}
