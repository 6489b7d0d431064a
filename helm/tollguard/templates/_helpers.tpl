{{/* =====================================================================
     Names and labels
     ===================================================================== */}}

{{- define "tollguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tollguard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of a component's objects: (dict "root" $ "component" "correlator") */}}
{{- define "tollguard.componentName" -}}
{{- printf "%s-%s" (include "tollguard.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* DNS-1035-safe form of a provider id (dots and underscores become dashes). */}}
{{- define "tollguard.carrierSlug" -}}
{{- . | replace "_" "-" | replace "." "-" -}}
{{- end -}}

{{/* Name of a carrier's ingester objects: (dict "root" $ "carrier" $c) */}}
{{- define "tollguard.ingesterName" -}}
{{- $base := include "tollguard.fullname" .root -}}
{{- $slug := include "tollguard.carrierSlug" .carrier.providerId -}}
{{- printf "%s-ingester-%s" $base $slug | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "tollguard.labels" -}}
helm.sh/chart: {{ include "tollguard.chart" . }}
app.kubernetes.io/name: {{ include "tollguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tollguard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: (dict "root" $ "component" "ingester" "carrier" $c) */}}
{{- define "tollguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollguard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .carrier }}
tollguard.io/carrier: {{ .carrier.providerId | quote }}
{{- end }}
{{- end -}}

{{/* Labels of a component's objects: (dict "root" $ "component" … "carrier" …) */}}
{{- define "tollguard.componentLabels" -}}
{{ include "tollguard.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- if .carrier }}
tollguard.io/carrier: {{ .carrier.providerId | quote }}
{{- end }}
{{- end -}}

{{/* Annotations of every object (empty when none). */}}
{{- define "tollguard.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end -}}

{{- define "tollguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tollguard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: (dict "root" $ "image" $componentImageOverride) */}}
{{- define "tollguard.image" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default dict .image) -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.imagePullPolicy" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default dict .image) -}}
{{- $img.pullPolicy -}}
{{- end -}}

{{/* =====================================================================
     Secrets
     ===================================================================== */}}

{{- define "tollguard.keySecretName" -}}
{{- if .Values.pseudonymization.existingSecret -}}
{{- .Values.pseudonymization.existingSecret -}}
{{- else -}}
{{- printf "%s-pseudonymization" (include "tollguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.keySecretKey" -}}
{{- if .Values.pseudonymization.existingSecret -}}
{{- .Values.pseudonymization.existingSecretKey -}}
{{- else -}}
key
{{- end -}}
{{- end -}}

{{- define "tollguard.kafkaSaslEnabled" -}}
{{- if .Values.kafka.sasl.mechanism }}true{{ end -}}
{{- end -}}

{{- define "tollguard.kafkaSecretName" -}}
{{- if .Values.kafka.sasl.existingSecret -}}
{{- .Values.kafka.sasl.existingSecret -}}
{{- else -}}
{{- printf "%s-kafka" (include "tollguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.kafkaUsernameKey" -}}
{{- if .Values.kafka.sasl.existingSecret }}{{ .Values.kafka.sasl.usernameKey }}{{ else }}username{{ end -}}
{{- end -}}

{{- define "tollguard.kafkaPasswordKey" -}}
{{- if .Values.kafka.sasl.existingSecret }}{{ .Values.kafka.sasl.passwordKey }}{{ else }}password{{ end -}}
{{- end -}}

{{/* True when the Redis URL comes from a Secret (existing or chart-made). */}}
{{- define "tollguard.redisFromSecret" -}}
{{- if or .Values.redis.existingSecret .Values.redis.password }}true{{ end -}}
{{- end -}}

{{- define "tollguard.redisSecretName" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" (include "tollguard.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollguard.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end -}}
{{- end -}}

{{/* Redis URL with the password inserted after the scheme. */}}
{{- define "tollguard.redisUrlWithPassword" -}}
{{- $parts := splitList "://" .Values.redis.url -}}
{{- printf "%s://:%s@%s" (first $parts) (.Values.redis.password | urlquery) (last $parts) -}}
{{- end -}}

{{/* =====================================================================
     Validation: fails the render with a message naming the value.
     ===================================================================== */}}

{{- define "tollguard.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.pseudonymization.existingSecret) (not $v.pseudonymization.key) -}}
{{- fail "pseudonymization: the consortium key is required and the chart ships none. Create a Secret (kubectl create secret generic tollguard-key --from-file=key=./key.hex, key from `openssl rand -hex 32`) and set pseudonymization.existingSecret=tollguard-key, or pass the key with --set-file pseudonymization.key=./key.hex" -}}
{{- end -}}
{{- if and $v.pseudonymization.existingSecret $v.pseudonymization.key -}}
{{- fail "pseudonymization: set either pseudonymization.existingSecret or pseudonymization.key, not both" -}}
{{- end -}}
{{- if and $v.pseudonymization.key (lt (len (trim $v.pseudonymization.key)) 32) -}}
{{- fail "pseudonymization.key must be at least 32 bytes (e.g. `openssl rand -hex 32`)" -}}
{{- end -}}
{{- if not $v.pseudonymization.keyId -}}
{{- fail "pseudonymization.keyId is required (the consortium key id carried in every token, e.g. k1)" -}}
{{- end -}}
{{- if not $v.kafka.bootstrap -}}
{{- fail "kafka.bootstrap is required: the Kafka bootstrap servers, e.g. kafka-0.kafka:9092,kafka-1.kafka:9092" -}}
{{- end -}}
{{- if and $v.kafka.sasl.mechanism (not $v.kafka.sasl.existingSecret) (or (not $v.kafka.sasl.username) (not $v.kafka.sasl.password)) -}}
{{- fail "kafka.sasl: with kafka.sasl.mechanism set, give kafka.sasl.existingSecret or both kafka.sasl.username and kafka.sasl.password" -}}
{{- end -}}
{{- if and $v.redis.password (not (contains "://" $v.redis.url)) -}}
{{- fail "redis.url must be a URL such as redis://redis-master:6379/ when redis.password is set" -}}
{{- end -}}
{{- if not $v.ingester.carriers -}}
{{- fail "ingester.carriers must list at least one carrier, e.g. [{providerId: kpn, homeCountry: NL}] (one ingester Deployment per carrier)" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $c := $v.ingester.carriers -}}
{{- if not $c.providerId -}}
{{- fail (printf "ingester.carriers[%d].providerId is required" $i) -}}
{{- end -}}
{{- if not $c.homeCountry -}}
{{- fail (printf "ingester.carriers[%d].homeCountry is required (ISO 3166-1 alpha-2, e.g. NL)" $i) -}}
{{- end -}}
{{- $name := include "tollguard.ingesterName" (dict "root" $ "carrier" $c) -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "ingester.carriers[%d] (%s): object name %s collides with carrier %s; shorten the release name or use distinct provider ids" $i $c.providerId $name (get $seen $name)) -}}
{{- end -}}
{{- $_ := set $seen $name $c.providerId -}}
{{- end -}}
{{- $parts := int $v.topics.calls.partitions -}}
{{- if and $v.correlator.autoscaling.enabled (gt (int $v.correlator.autoscaling.maxReplicas) $parts) -}}
{{- fail (printf "correlator.autoscaling.maxReplicas (%d) exceeds topics.calls.partitions (%d): replicas beyond the partition count would sit idle" (int $v.correlator.autoscaling.maxReplicas) $parts) -}}
{{- end -}}
{{- if and $v.correlator.keda.enabled (gt (int $v.correlator.keda.maxReplicaCount) $parts) -}}
{{- fail (printf "correlator.keda.maxReplicaCount (%d) exceeds topics.calls.partitions (%d): replicas beyond the partition count would sit idle" (int $v.correlator.keda.maxReplicaCount) $parts) -}}
{{- end -}}
{{- if and $v.correlator.keda.enabled $v.correlator.autoscaling.enabled -}}
{{- fail "correlator: enable either correlator.autoscaling (HPA) or correlator.keda (ScaledObject), not both; KEDA manages its own HPA" -}}
{{- end -}}
{{- end -}}

{{/* =====================================================================
     TOML rendering
     ===================================================================== */}}

{{/* A TOML value: strings quoted (JSON escapes are valid TOML), whole
     numbers as integers (values.yaml numbers arrive as float64), lists
     element-wise. */}}
{{- define "tollguard.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{- if $i }}, {{ end -}}{{- include "tollguard.tomlValue" $e -}}{{- end -}}]
{{- else if kindIs "invalid" . -}}
""
{{- else -}}
{{- toJson (toString .) -}}
{{- end -}}
{{- end -}}

{{/* A socket address for host and port (IPv6 hosts in brackets). */}}
{{- define "tollguard.sockaddr" -}}
{{- if contains ":" .host -}}
[{{ .host }}]:{{ int .port }}
{{- else -}}
{{ .host }}:{{ int .port }}
{{- end -}}
{{- end -}}

{{/* The [kafka] section: (dict "root" $ "clientId" "…" "settings" $componentKafkaOverrides) */}}
{{- define "tollguard.tomlKafka" -}}
{{- $k := .root.Values.kafka -}}
[kafka]
bootstrap = {{ include "tollguard.tomlValue" $k.bootstrap }}
client_id = {{ include "tollguard.tomlValue" .clientId }}
{{- range $key, $val := .settings }}
{{ $key }} = {{ include "tollguard.tomlValue" $val }}
{{- end }}
{{- $extra := dict -}}
{{- range $key, $val := $k.extra }}{{ $_ := set $extra $key $val }}{{ end -}}
{{- if $k.securityProtocol }}{{ $_ := set $extra "security.protocol" $k.securityProtocol }}{{ end -}}
{{- if $k.sasl.mechanism }}{{ $_ := set $extra "sasl.mechanism" $k.sasl.mechanism }}{{ end -}}
{{- if $k.tls.caSecret }}{{ $_ := set $extra "ssl.ca.location" "/etc/tollguard/kafka-tls/ca.crt" }}{{ end -}}
{{- if $extra }}

[kafka.extra]
# SASL credentials come from the environment
# (TOLLGUARD__KAFKA__EXTRA__SASL__USERNAME / __PASSWORD), never from this file.
{{- range $key, $val := $extra }}
{{ toJson $key }} = {{ include "tollguard.tomlValue" (toString $val) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* =====================================================================
     Pod building blocks
     ===================================================================== */}}

{{/* Environment shared by the services: (dict "root" $ "comp" $values "component" "…" "configPath" "…") */}}
{{- define "tollguard.env" -}}
{{- $v := .root.Values -}}
- name: TOLLGUARD_CONFIG
  value: {{ .configPath | quote }}
- name: TOLLGUARD_LOG_FORMAT
  value: {{ $v.log.format | quote }}
- name: RUST_LOG
  value: {{ $v.log.level | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if $v.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.tracing.otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "tollguard-%s" .component | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.tracing.samplerRatio | toString | quote }}
{{- $attrs := list "service.namespace=tollguard" (printf "k8s.namespace.name=%s" .root.Release.Namespace) }}
{{- range $k, $val := $v.tracing.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $val)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "%s,k8s.pod.name=$(POD_NAME)" (join "," $attrs) | quote }}
- name: OTEL_BSP_SCHEDULE_DELAY
  value: {{ $v.tracing.exportDelayMs | int | toString | quote }}
{{- end }}
{{- if $v.kafka.sasl.mechanism }}
- name: TOLLGUARD__KAFKA__EXTRA__SASL__USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "tollguard.kafkaSecretName" .root }}
      key: {{ include "tollguard.kafkaUsernameKey" .root }}
- name: TOLLGUARD__KAFKA__EXTRA__SASL__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tollguard.kafkaSecretName" .root }}
      key: {{ include "tollguard.kafkaPasswordKey" .root }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .comp.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes shared by the services: (dict "root" $ "configMap" "…" "key" bool) */}}
{{- define "tollguard.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
- name: config
  configMap:
    name: {{ .configMap }}
{{- if .key }}
- name: pseudonymization-key
  secret:
    secretName: {{ include "tollguard.keySecretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ include "tollguard.keySecretKey" .root }}
        path: key
{{- end }}
{{- if .root.Values.kafka.tls.caSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .root.Values.kafka.tls.caSecret }}
    defaultMode: 0444
    items:
      - key: {{ .root.Values.kafka.tls.caKey }}
        path: ca.crt
{{- end }}
{{- end -}}

{{- define "tollguard.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/tollguard/config
  readOnly: true
{{- if .key }}
- name: pseudonymization-key
  mountPath: /etc/tollguard/secrets/pseudonymization
  readOnly: true
{{- end }}
{{- if .root.Values.kafka.tls.caSecret }}
- name: kafka-tls
  mountPath: /etc/tollguard/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* One probe: (dict "probe" $p "path" "/livez" "grpcPort" 0) — an httpGet on
     the `http` port, or a grpc probe when grpcPort is set. */}}
{{- define "tollguard.probe" -}}
{{- if .grpcPort }}
grpc:
  port: {{ .grpcPort }}
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
{{- end }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: 1
{{- end -}}

{{/* The three probes of a component: (dict "comp" $values "grpcPort" N) */}}
{{- define "tollguard.probes" -}}
{{- if .comp.startupProbe.enabled }}
startupProbe:
  {{- $grpc := 0 }}
  {{- if and .grpcPort (eq (default "http" .comp.startupProbe.kind) "grpc") }}{{ $grpc = .grpcPort }}{{ end }}
  {{- include "tollguard.probe" (dict "probe" .comp.startupProbe "path" "/livez" "grpcPort" $grpc) | trim | nindent 2 }}
{{- end }}
{{- if .comp.livenessProbe.enabled }}
livenessProbe:
  {{- include "tollguard.probe" (dict "probe" .comp.livenessProbe "path" "/livez" "grpcPort" 0) | trim | nindent 2 }}
{{- end }}
{{- if .comp.readinessProbe.enabled }}
readinessProbe:
  {{- include "tollguard.probe" (dict "probe" .comp.readinessProbe "path" "/readyz" "grpcPort" 0) | trim | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Affinity: the component's own, else the anti-affinity preset. */}}
{{- define "tollguard.affinity" -}}
{{- if .comp.affinity -}}
{{ toYaml .comp.affinity }}
{{- else if eq .comp.podAntiAffinityPreset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "tollguard.selectorLabels" .sel | nindent 12 }}
{{- else if eq .comp.podAntiAffinityPreset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "tollguard.selectorLabels" .sel | nindent 10 }}
{{- end -}}
{{- end -}}

{{/* Topology spread constraints, with the component's selector added when absent. */}}
{{- define "tollguard.topologySpread" -}}
{{- $sel := .sel -}}
{{- $out := list -}}
{{- range .comp.topologySpreadConstraints -}}
{{- $item := deepCopy . -}}
{{- if not $item.labelSelector -}}
{{- $_ := set $item "labelSelector" (dict "matchLabels" (include "tollguard.selectorLabels" $sel | fromYaml)) -}}
{{- end -}}
{{- $out = append $out $item -}}
{{- end -}}
{{- if $out }}{{ toYaml $out }}{{ end -}}
{{- end -}}

{{/* PodDisruptionBudget spec body: minAvailable when set, else maxUnavailable. */}}
{{- define "tollguard.pdbPolicy" -}}
{{- if and (not (kindIs "invalid" .minAvailable)) (ne (toString .minAvailable) "") -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ default 1 .maxUnavailable }}
{{- end -}}
{{- end -}}

{{/* HPA metrics list. */}}
{{- define "tollguard.hpaMetrics" -}}
{{- if .targetCPUUtilizationPercentage }}
- type: Resource
  resource:
    name: cpu
    target:
      type: Utilization
      averageUtilization: {{ int .targetCPUUtilizationPercentage }}
{{- end }}
{{- if .targetMemoryUtilizationPercentage }}
- type: Resource
  resource:
    name: memory
    target:
      type: Utilization
      averageUtilization: {{ int .targetMemoryUtilizationPercentage }}
{{- end }}
{{- end -}}
