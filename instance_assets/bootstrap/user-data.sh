#!/bin/bash
# spotguard stage 1 (Fn::Sub template: no brace variables). See docs/agent.md
R=$SPOTGUARD_ROOT M=$SPOTGUARD_IMDS_URL F=${Fleet} I= t=60
O=$R/opt/spotguard
[ "$M" ] || M=http://169.254.169.254
export AWS_DEFAULT_REGION=${Region} SPOTGUARD_IMDS_URL=$M SPOTGUARD_FLEET_NAME=$F \
SPOTGUARD_AGENT_CONFIG_PARAMETER=${ConfigParameter}
mkdir -p $O $R/var/log
exec &> >(tee -a $R/var/log/spotguard-bootstrap.log | (logger -t spotguard-bootstrap || cat >/dev/null))
E=$(($(date +%s) - $(cut -d. -f1 /proc/uptime) + ${DeadlineSeconds}))
log() { echo "$(date -u +%FT%TZ) $*"; }
left() { echo $((E - $(date +%s))); }
a() { timeout $t aws --cli-connect-timeout 30 "$@" >/dev/null; }
die() {
log "FATAL: $1"
r=$(echo "$1" | tr -cd '[:alnum:] ._:/-' | cut -c1-250) t=60
[ "$I" ] && {
a dynamodb update-item --table-name ${FleetTable} --key instance_id={S=$I} --update-expression \
'SET bootstrap_status=:s,bootstrap_reason=:r,fleet=:f' --expression-attribute-values ":s={S=failed},:r={S=$r},:f={S=$F}"
a ec2 create-tags --resources $I --tags Key=spotguard:bootstrap,Value=failed "Key=spotguard:bootstrap-reason,Value=$r"
a autoscaling complete-lifecycle-action --auto-scaling-group-name ${AsgName} \
--lifecycle-hook-name ${LaunchHook} --instance-id $I --lifecycle-action-result ABANDON
}
log shutdown; shutdown -h now; exit 1
}
for n in 1 2 3 4 5; do
Q=$(curl -sf -m5 -XPUT $M/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') &&
I=$(curl -sf -m5 -H "X-aws-ec2-metadata-token: $Q" $M/latest/meta-data/instance-id) && break
sleep 2
done
[ "$I" ] || die "imds: no instance id"
log "fleet $F instance $I: $(left) s left"
Z=$O/bundle.tgz S=$O/staging
for n in 0 1 2 3 4 5; do
t=$(left); [ $t -gt 120 ] && t=120
[ $t -gt 0 ] && a s3 cp --only-show-errors ${BundleUrl} $Z && break
[ $n = 5 ] && die "download failed after 5 retries"
s=$((10 << n)); [ $s -gt 50 ] && s=50
[ $s -lt $(left) ] || die "deadline passed in download"
log "retry in $s s"; sleep $s
done
echo "${BundleSha256}  $Z" | sha256sum -c --status || die "bundle sha256 mismatch"
rm -rf $S; mkdir -p $S && tar -xzf $Z -C $S || die "bundle extract failed"
P=python3.11
command -v $P || dnf -y install $P $P-pip
t=$(left)
[ $t -gt 0 ] || die "deadline passed before install"
timeout $t $P $S/install.py --root "$R/" --bundle $S --instance-id $I --deadline-epoch $E
c=$?
[ $c = 124 ] && die "deadline passed in install"
[ $c = 0 ] || die "install failed: $(tail -n1 $O/install-failure)"
log "bootstrap done"
