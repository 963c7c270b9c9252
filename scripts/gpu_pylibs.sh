# Sourced by the GPU scripts: put the carried packages (.carry/pylibs.tar.xz from scripts/gpu_carry.sh) in front of
# the image's own on PYTHONPATH. Returns 1 when no carry was sent, so a caller can fall back (e.g. to .whl wheels).
if [ -f .carry/pylibs.tar.xz ]; then
  mkdir -p /tmp/mmeff-pylibs && tar -xJf .carry/pylibs.tar.xz -C /tmp/mmeff-pylibs \
    && export PYTHONPATH="/tmp/mmeff-pylibs${PYTHONPATH:+:$PYTHONPATH}"
else
  false
fi
