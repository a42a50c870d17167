#!/usr/bin/env bash
# .ci/install_multinode.sh: what the two-host tests (tests/cluster/test_two_hosts.py) need on a Debian/Ubuntu
# CI machine, installed idempotently (a second run changes nothing):
#   pdsh, openssh-server/-client, iproute2 (ip netns), util-linux (unshare, mount), openmpi-bin (mpirun, orted);
#   sshd's host keys and privilege-separation directory; a key pair for the current user that the user itself
#   accepts (passwordless ssh to this host, as pdsh needs on a real cluster: it ssh-es to the launch node too).
# The tests make their own throwaway keys and ssh config; they do not depend on ~/.ssh. Without root the script
# only says what it would need and exits 0: the tests then skip, stating why.
set -euo pipefail

if [[ "$(id -u)" != 0 ]]; then
  echo "install_multinode: not root; skipping (the two-host tests will skip: they need root for ip netns)"
  exit 0
fi

need=()
command -v pdsh >/dev/null || need+=(pdsh)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null && command -v mount >/dev/null || need+=(util-linux mount)
command -v mpirun >/dev/null && command -v ompi_info >/dev/null || need+=(openmpi-bin)
if (( ${#need[@]} )); then
  echo "install_multinode: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "install_multinode: pdsh, sshd, ssh, ip, unshare, mpirun already installed"
fi

# sshd: host keys and the privilege separation directory (a fresh container has neither).
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
chmod 0755 /run/sshd

# The current user's key, accepted by itself: passwordless ssh to this host.
mkdir -p ~/.ssh
chmod 700 ~/.ssh
[[ -f ~/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "ofa_ds-ci" -f ~/.ssh/id_ed25519
touch ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
grep -qxF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys

# Can this machine make network namespaces? (Containers without CAP_SYS_ADMIN cannot: the tests then skip.)
probe="ofamn-install-probe-$$"
if ip netns add "$probe" 2>/dev/null; then
  ip netns delete "$probe"
  echo "install_multinode: ip netns works; the two-host tests will run"
else
  echo "install_multinode: ip netns is not permitted here; the two-host tests will skip"
fi
