# Source on the GPU machine (device tool): unpack the carried package bundle (../shared/device)
# and wheels, and point Python at them and at this checkout.
set -e
mkdir -p /tmp/site
if [ -f .carry/site.tar.xz ] && [ ! -f /tmp/site/.unpacked ]; then
  xz -dc .carry/site.tar.xz | tar -x -C /tmp/site && touch /tmp/site/.unpacked
fi
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/whl/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/whl .whl/*.whl && touch /tmp/whl/.installed
fi
export PYTHONPATH=$PWD:/tmp/site:/tmp/whl:$PYTHONPATH PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
set +e
