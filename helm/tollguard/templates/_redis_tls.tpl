{{/* TLS to Redis (`rediss://`): redis.tls.caSecret (CA bundle) and
     redis.tls.clientSecret (client certificate), mounted into the correlator
     and the notifier and rendered as their [redis.tls] section. */}}

{{/* The [redis.tls] TOML section (empty without redis.tls secrets). */}}
{{- define "tollguard.redisTlsToml" -}}
{{- $t := .Values.redis.tls -}}
{{- if or $t.caSecret $t.clientSecret -}}
{{- if and (not (include "tollguard.redisFromSecret" .)) (not (hasPrefix "rediss://" .Values.redis.url)) -}}
{{- fail "redis.tls.caSecret / redis.tls.clientSecret need a rediss:// redis.url (TLS files are only used over TLS)" -}}
{{- end -}}
[redis.tls]
{{- if $t.caSecret }}
ca_file = "/etc/tollguard/redis-tls/ca/ca.crt"
{{- end }}
{{- if $t.clientSecret }}
cert_file = "/etc/tollguard/redis-tls/client/tls.crt"
key_file = "/etc/tollguard/redis-tls/client/tls.key"
{{- end }}
{{- end -}}
{{- end -}}

{{/* Pod volumes of the redis.tls secrets (YAML list items, may be empty). */}}
{{- define "tollguard.redisTlsVolumes" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.caSecret }}
- name: redis-tls-ca
  secret:
    secretName: {{ $t.caSecret }}
    defaultMode: 0444
    items:
      - key: {{ $t.caKey }}
        path: ca.crt
{{- end }}
{{- if $t.clientSecret }}
- name: redis-tls-client
  secret:
    secretName: {{ $t.clientSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end -}}

{{/* Their mounts. */}}
{{- define "tollguard.redisTlsMounts" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.caSecret }}
- name: redis-tls-ca
  mountPath: /etc/tollguard/redis-tls/ca
  readOnly: true
{{- end }}
{{- if $t.clientSecret }}
- name: redis-tls-client
  mountPath: /etc/tollguard/redis-tls/client
  readOnly: true
{{- end }}
{{- end -}}
