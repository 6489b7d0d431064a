{{/* The correlator's config.toml. */}}
{{- define "tollguard.correlatorConfig" -}}
{{- $v := .Values -}}
{{- $c := $v.correlator -}}
# tollguard-correlator, rendered by the tollguard Helm chart. Any key can be
# overridden with TOLLGUARD__SECTION__KEY.
group = {{ include "tollguard.tomlValue" $c.config.group }}
batch_max = {{ include "tollguard.tomlValue" $c.config.batchMax }}
poll_timeout_ms = {{ include "tollguard.tomlValue" $c.config.pollTimeoutMs }}
hot_list_refresh_s = {{ include "tollguard.tomlValue" $c.config.hotListRefreshS }}
# Every carrier of the consortium: window state is not pruned until each has
# been seen, so a carrier backfilling late still joins the others.
expected_providers = [{{- range $i, $carrier := $v.ingester.carriers }}{{ if $i }}, {{ end }}{{ $carrier.providerId | quote }}{{- end }}]
rules_file = "/etc/tollguard/rules/rules.toml"
policies_file = "/etc/tollguard/policies/policies.toml"

[listen]
http = {{ include "tollguard.sockaddr" (dict "host" $c.listenAddress "port" $c.httpPort) | quote }}

[topics]
calls = {{ include "tollguard.tomlValue" $v.topics.calls.name }}
alerts = {{ include "tollguard.tomlValue" $v.topics.alerts.name }}
dlq = {{ include "tollguard.tomlValue" $v.topics.dlq.name }}

[redis]
{{- if include "tollguard.redisFromSecret" . }}
# url comes from the environment (TOLLGUARD__REDIS__URL, from a Secret).
{{- else }}
url = {{ include "tollguard.tomlValue" $v.redis.url }}
{{- end }}
key_prefix = {{ include "tollguard.tomlValue" $v.redis.keyPrefix }}
{{- with include "tollguard.redisTlsToml" . }}

{{ . }}
{{- end }}
{{- if $c.mountPseudonymizationKey }}

# The consortium key resolves policies that name customers by id.
[pseudonymization]
key_id = {{ include "tollguard.tomlValue" $v.pseudonymization.keyId }}
key_file = "/etc/tollguard/secrets/pseudonymization/key"
{{- end }}

{{ include "tollguard.tomlKafka" (dict "root" . "clientId" "tollguard-correlator" "settings" $c.config.kafka) }}
{{- end -}}

{{- define "tollguard.correlatorRules" -}}
{{- if .Values.correlator.rules.toml -}}
{{- .Values.correlator.rules.toml -}}
{{- else -}}
{{- .Files.Get "files/rules.toml" -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.correlatorPolicies" -}}
{{- if .Values.correlator.policies.toml -}}
{{- .Values.correlator.policies.toml -}}
{{- else -}}
# No per-customer policies: every customer gets the defaults of rules.toml.
# Add [[policy]] entries (customer_id or token, daily_cap_eur,
# hourly_cap_eur, channels, label) with correlator.policies.toml.
{{- end -}}
{{- end -}}
