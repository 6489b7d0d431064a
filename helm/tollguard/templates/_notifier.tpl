{{/* The notifier's config.toml. */}}
{{- define "tollguard.notifierConfig" -}}
{{- $v := .Values -}}
{{- $c := $v.notifier -}}
# tollguard-notifier, rendered by the tollguard Helm chart. Any key can be
# overridden with TOLLGUARD__SECTION__KEY.
group = {{ include "tollguard.tomlValue" $c.config.group }}
alerts_topic = {{ include "tollguard.tomlValue" $v.topics.alerts.name }}

[listen]
http = {{ include "tollguard.sockaddr" (dict "host" $c.listenAddress "port" $c.httpPort) | quote }}
{{- if $c.grpcPort }}
grpc = {{ include "tollguard.sockaddr" (dict "host" $c.listenAddress "port" $c.grpcPort) | quote }}
{{- end }}

[redis]
{{- if not $c.config.redis }}
# incident state in memory (notifier.config.redis = false): one replica only
{{- else if include "tollguard.redisFromSecret" . }}
# url comes from the environment (TOLLGUARD__REDIS__URL, from a Secret).
{{- else }}
url = {{ include "tollguard.tomlValue" $v.redis.url }}
{{- end }}
key_prefix = {{ include "tollguard.tomlValue" $v.redis.keyPrefix }}
{{- if $c.config.redis }}
{{- with include "tollguard.redisTlsToml" . }}

{{ . }}
{{- end }}
{{- end }}
{{- if $c.grpcPort }}

# The Alerts API.
[tls]
{{- if $c.tls.enabled }}
cert_file = "/etc/tollguard/secrets/tls/tls.crt"
key_file = "/etc/tollguard/secrets/tls/tls.key"
client_ca_file = "/etc/tollguard/secrets/tls/ca.crt"
[tls.clients]
{{- if $c.tls.clients }}
{{- range $id, $principal := $c.tls.clients }}
{{ toJson $id }} = {{ include "tollguard.tomlValue" $principal }}
{{- end }}
{{- else }}
{{- range $carrier := $v.ingester.carriers }}
{{- range (default (list $carrier.providerId) $carrier.clientIdentities) }}
{{ toJson . }} = {{ include "tollguard.tomlValue" $carrier.providerId }}
{{- end }}
{{- end }}
{{- end }}
{{- else }}
# plaintext development mode (notifier.tls.enabled = false)
enabled = false
{{- end }}
{{- end }}

{{ include "tollguard.tomlKafka" (dict "root" . "clientId" "tollguard-notifier" "settings" $c.config.kafka) }}
{{- end -}}
