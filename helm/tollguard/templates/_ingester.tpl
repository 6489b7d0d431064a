{{/* A carrier's ingester values: the carrier's entry merged over `ingester`
     (lists replace, except extraEnv/extraEnvFrom which are concatenated).
     Returns YAML: use with fromYaml. (dict "root" $ "carrier" $c) */}}
{{- define "tollguard.ingesterValues" -}}
{{- $defaults := omit .root.Values.ingester "carriers" | deepCopy -}}
{{- $c := deepCopy .carrier -}}
{{- $merged := mergeOverwrite $defaults (omit $c "extraEnv" "extraEnvFrom") -}}
{{- $_ := set $merged "extraEnv" (concat (default list .root.Values.ingester.extraEnv) (default list .carrier.extraEnv)) -}}
{{- $_ := set $merged "extraEnvFrom" (concat (default list .root.Values.ingester.extraEnvFrom) (default list .carrier.extraEnvFrom)) -}}
{{- $_ := set $merged "grpcPort" (default .root.Values.ingester.service.grpcPort .carrier.grpcPort) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* A carrier's config.toml: (dict "root" $ "comp" $merged) */}}
{{- define "tollguard.ingesterConfig" -}}
{{- $v := .root.Values -}}
{{- $c := .comp -}}
# tollguard-ingester for carrier {{ $c.providerId | quote }}, rendered by the
# tollguard Helm chart. Any key can be overridden with TOLLGUARD__SECTION__KEY.
provider_id = {{ include "tollguard.tomlValue" $c.providerId }}
topic = {{ include "tollguard.tomlValue" $v.topics.calls.name }}

[listen]
grpc = {{ include "tollguard.sockaddr" (dict "host" $c.listenAddress "port" $c.grpcPort) | quote }}
http = {{ include "tollguard.sockaddr" (dict "host" $c.listenAddress "port" $c.httpPort) | quote }}

[dial_plan]
home_country = {{ include "tollguard.tomlValue" $c.homeCountry }}
international_prefix = {{ include "tollguard.tomlValue" (default "00" $c.internationalPrefix | toString) }}
national_prefix = {{ include "tollguard.tomlValue" (ternary "0" (toString $c.nationalPrefix) (kindIs "invalid" $c.nationalPrefix)) }}
strip_prefixes = {{ include "tollguard.tomlValue" (default list $c.stripPrefixes) }}

[pseudonymization]
key_id = {{ include "tollguard.tomlValue" $v.pseudonymization.keyId }}
key_file = "/etc/tollguard/secrets/pseudonymization/key"
range_digits = {{ include "tollguard.tomlValue" $v.pseudonymization.rangeDigits }}

[limits]
max_batch_records = {{ include "tollguard.tomlValue" $c.config.maxBatchRecords }}
max_message_bytes = {{ include "tollguard.tomlValue" $c.config.maxMessageBytes }}
max_concurrent_streams = {{ include "tollguard.tomlValue" $c.config.maxConcurrentStreams }}

[tls]
{{- if $c.tls.enabled }}
cert_file = "/etc/tollguard/secrets/tls/tls.crt"
key_file = "/etc/tollguard/secrets/tls/tls.key"
client_ca_file = "/etc/tollguard/secrets/tls/ca.crt"
[tls.clients]
{{- range (default (list $c.providerId) $c.clientIdentities) }}
{{ toJson . }} = {{ include "tollguard.tomlValue" $c.providerId }}
{{- end }}
{{- else }}
# plaintext development mode (ingester.tls.enabled = false)
enabled = false
{{- end }}
{{- if and $c.reference.existingConfigMap (or $c.reference.riskTable $c.reference.rateDeck) }}

[reference]
{{- if $c.reference.riskTable }}
risk_table = "/etc/tollguard/reference/risk_table.csv"
{{- end }}
{{- if $c.reference.rateDeck }}
rate_deck = "/etc/tollguard/reference/rate_deck.csv"
{{- end }}
{{- end }}

{{ include "tollguard.tomlKafka" (dict "root" .root "clientId" (printf "tollguard-ingester-%s" $c.providerId) "settings" $c.config.kafka) }}
{{- with $c.csv }}

# How this carrier's CSV export maps onto the partner record (used by
# `tollguard send` and `tollguard replay --csv-mapping` with this file).
[csv]
{{- if .delimiter }}
delimiter = {{ include "tollguard.tomlValue" .delimiter }}
{{- end }}
{{- if .timeZone }}
time_zone = {{ include "tollguard.tomlValue" .timeZone }}
{{- end }}
{{- if .timeFormat }}
time_format = {{ include "tollguard.tomlValue" .timeFormat }}
{{- end }}
{{- with .columns }}
[csv.columns]
{{- range $k, $val := . }}
{{ toJson $k }} = {{ include "tollguard.tomlValue" (toString $val) }}
{{- end }}
{{- end }}
{{- with .constants }}
[csv.constants]
{{- range $k, $val := . }}
{{ toJson $k }} = {{ include "tollguard.tomlValue" (toString $val) }}
{{- end }}
{{- end }}
{{- range $field, $map := .values }}
[csv.values.{{ toJson $field }}]
{{- range $k, $val := $map }}
{{ toJson $k }} = {{ include "tollguard.tomlValue" (toString $val) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
