#!/bin/sh
# The smallest complete participant in shell (docs/participants.md), run by
#   liveupdatectl keep --session counter-sh --size 20 -- counter.sh
# which hands it the memfd ($LIVEUPDATE_FILE): the carried one after a live update, else a new one.
count=$(tr -dc 0-9 < "$LIVEUPDATE_FILE")
echo "counter-sh: starting at ${count:-0}${LIVEUPDATE_UPDATE:+ after live update $LIVEUPDATE_UPDATE}"
while sleep 0.1; do
    count=$((${count:-0} + 1))
    # 1<> writes in place: once preserved, the memfd's size must not change.
    printf '%-20s' "$count" 1<> "$LIVEUPDATE_FILE"
done
