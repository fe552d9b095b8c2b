#!/usr/bin/env bash
# Generate the credentials of a local TLS + SuperNode-auth federation.
#
#   deploy/gen_certs.sh OUT_DIR [NUM_SUPERNODES] [SERVER_NAMES]
#
# Writes into OUT_DIR (openssl and ssh-keygen only):
#   ca.crt / ca.key                 a self-signed CA (RSA, KEY_BITS=4096 bits, CERT_DAYS=365)
#   server.pem / server.key         the SuperLink certificate, signed by the CA, with
#                                   SubjectAltName DNS:localhost, IP:127.0.0.1 (and
#                                   any extra names given as SERVER_NAMES, e.g.
#                                   "DNS:link.lan,IP:192.168.1.10")
#   supernode_I / supernode_I.pub   ECDSA (P-384) OpenSSH key pair of SuperNode I,
#                                   I = 0..NUM_SUPERNODES-1 (Flower's node auth uses
#                                   EC keys in OpenSSH format)
#   server.cnf                      the openssl request/extension config used
# Private keys are mode 600. Existing files are overwritten.
set -euo pipefail

out="${1:?usage: gen_certs.sh OUT_DIR [NUM_SUPERNODES] [EXTRA_SAN]}"
n="${2:-3}"
extra_san="${3:-}"
days="${CERT_DAYS:-365}"

mkdir -p "$out"
cd "$out"
umask 077

san="DNS:localhost,IP:127.0.0.1,IP:::1"
if [[ -n "$extra_san" ]]; then
  san="$san,$extra_san"
fi

# 1. Certificate authority.
openssl genrsa -out ca.key "${KEY_BITS:-4096}" 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days "$days" \
  -subj "/O=agentfl/CN=agentfl local CA" -out ca.crt

# 2. SuperLink server certificate with SubjectAltName (gRPC/HTTPS verify the SAN, not
#    the CN).
openssl genrsa -out server.key "${KEY_BITS:-4096}" 2>/dev/null
cat > server.cnf <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
O = agentfl
CN = localhost
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
CNF
openssl req -new -key server.key -config server.cnf -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -days "$days" -sha256 -extfile server.cnf -extensions ext -out server.pem 2>/dev/null
rm -f server.csr ca.srl
openssl verify -CAfile ca.crt server.pem >/dev/null

# 3. SuperNode authentication key pairs.
for ((i = 0; i < n; i++)); do
  rm -f "supernode_$i" "supernode_$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "agentfl-supernode-$i" -f "supernode_$i"
done

chmod 644 ca.crt server.pem ./*.pub 2>/dev/null || true
echo "credentials in $(pwd): ca.crt server.pem server.key, $n SuperNode key pairs (supernode_I, supernode_I.pub)"
