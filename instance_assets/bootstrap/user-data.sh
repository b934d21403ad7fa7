#!/bin/bash
# spotguard stage 1 (docs/agent.md)
R=$SPOTGUARD_ROOT F=${Fleet} B=spotguard:bootstrap
O=$R/opt/spotguard Z=$O/bundle.tgz S=$O/staging
export AWS_DEFAULT_REGION=${Region} SPOTGUARD_FLEET_NAME=$F
exec &> >(tee -a $R/var/log/spotguard-bootstrap.log | (logger -t spotguard-bootstrap || cat >/dev/null))
E=$(($(date +%s) - $(cut -d. -f1 /proc/uptime) + ${DeadlineSeconds}))
log() { echo "$(date -u +%T) $*"; }
left() { echo $((E - $(date +%s))); }
a() { timeout $t aws "$@" >/dev/null; }
die() {
log "FATAL: $1"
r=$(echo "$1" | tr -cd '[:alnum:] ._:/-') t=60
a dynamodb update-item --table-name ${FleetTable} --key pk={S=${InstanceArnPrefix}$I} --update-expression \
'SET bootstrap_status=:s,bootstrap_reason=:r,fleet=:f' --expression-attribute-values ":s={S=failed},:r={S=$r},:f={S=$F}"
a ec2 create-tags --resources $I --tags Key=$B,Value=failed "Key=$B-reason,Value=$r"
a autoscaling complete-lifecycle-action --auto-scaling-group-name ${AsgName} \
--lifecycle-hook-name ${LaunchHook} --instance-id $I --lifecycle-action-result ABANDON
shutdown -h now; exit 1
}
I=$(cat $R/var/lib/cloud/data/instance-id) || die "no instance id"
for s in 10 20 40 50 50 -; do
t=$(left); ((t > 120)) && t=120
((t > 0)) && a s3 cp ${BundleUrl} $Z && break
[ $s = - ] && die "download failed after 5 retries"
[ $s -lt $(left) ] || die "deadline passed in download"
log "retry in $s s"; sleep $s
done
echo "${BundleSha256}  $Z" | sha256sum -c --status || die "bundle sha256 mismatch"
rm -rf $S; mkdir -p $S; tar -xzf $Z -C $S || die "bundle extract failed"
t=$(left); [ $t -gt 0 ] || die "deadline passed before install"
timeout $t python3 $S/install.py --deadline-epoch $E --config-parameter ${ConfigParameter} ||
die "install failed: $(tail -n1 $O/install-failure)"
log "bootstrap done"
