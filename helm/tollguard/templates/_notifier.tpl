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

{{ include "tollguard.tomlKafka" (dict "root" . "clientId" "tollguard-notifier" "settings" $c.config.kafka) }}
{{- end -}}
