{{/* Ports list for a NetworkPolicy rule: (dict "ports" list "protocol" "TCP") */}}
{{- define "tollguard.npPorts" -}}
{{- range .ports }}
- port: {{ int . }}
  protocol: {{ $.protocol | default "TCP" }}
{{- end }}
{{- end -}}

{{/* An egress rule to `to` (peers, may be empty = anywhere) on `ports`. */}}
{{- define "tollguard.npEgressRule" -}}
- ports:
    {{- include "tollguard.npPorts" (dict "ports" .ports) | trim | nindent 4 }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Egress every TollGuard pod needs: DNS, Kafka, OTLP, extras. */}}
{{- define "tollguard.npCommonEgress" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{ include "tollguard.npEgressRule" (dict "ports" $np.kafka.ports "to" $np.kafka.to) }}
{{- if .Values.tracing.otlpEndpoint }}
{{ include "tollguard.npEgressRule" (dict "ports" $np.otlp.ports "to" $np.otlp.to) }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Ingress every TollGuard pod allows: metrics scrapes on `http`, extras. */}}
{{- define "tollguard.npMetricsIngress" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    - port: http
      protocol: TCP
  from:
    - namespaceSelector:
        {{- toYaml $np.metricsNamespaceSelector | nindent 8 }}
      {{- with $np.metricsPodSelector }}
      podSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- with $np.extraIngress }}
{{ toYaml . }}
{{- end }}
{{- end -}}
