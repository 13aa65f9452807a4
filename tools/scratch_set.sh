# Sourced by tools/batch_by_compare.sh and tools/instances_real.sh: a scratch copy of this
# checkout with one data set's prepare keys, the shared real sets copied in (never into the repo).
#   scratch_set SRC REAL DIR SET     (SET: syn | voc | em | nuclei); leaves the shell in DIR

scratch_set() {
  local src=$1 real=$2 dir=$3 set=$4
  rm -rf "$dir" && mkdir -p "$dir"
  (cd "$src" && tar cf - --exclude=./.git --exclude=./.venv --exclude=./data/prepared \
      --exclude=./models --exclude=./metrics --exclude=./.dvc/cache --exclude=./.cdsam .) \
    | (cd "$dir" && tar xf -)
  cd "$dir"
  case $set in
    syn) ;;
    voc) mkdir -p data/raw/voc && cp -r "$real/voc-samples/." data/raw/voc/
         sed -i 's|^  source: synthetic |  source: voc |; s|^  root: null |  root: data/raw/voc |' \
             params.yaml ;;
    em) mkdir -p data/raw/em && cp -r "$real/isbi2012-em/." data/raw/em/
        sed -i 's|^  source: synthetic |  source: folders |; s|^  images: null |  images: data/raw/em/images |; s|^  masks: null |  masks: data/raw/em/masks |; s|^  prompt: null |  prompt: "a cell" |' \
            params.yaml ;;
    nuclei) mkdir -p data/raw/nuclei && cp -r "$real/dsb2018-nuclei-subset/." data/raw/nuclei/
            sed -i 's|^  source: synthetic |  source: folders |; s|^  images: null |  images: data/raw/nuclei/images |; s|^  masks: null |  masks: data/raw/nuclei/masks |; s|^  prompt: null |  prompt: "a nucleus" |; s|^  mask_format: binary |  mask_format: instances |' \
                params.yaml ;;
    *) echo "unknown set $set (syn | voc | em | nuclei)" >&2; return 2 ;;
  esac
}
