{{/*
The Deployment of one component (or of one carrier's ingester). Parameters:
  root        the chart context ($)
  comp        the component's values (a carrier's merged over ingester)
  component   ingester | correlator | notifier
  carrier     the carrier entry (ingesters only)
  name        object name
  binary      binary in /usr/local/bin
  configMap   name of the ConfigMap with config.toml
  checksum    checksum of the rendered config (rolls the pods on change)
  grpcPort    gRPC container port (ingesters only)
  key         mount the pseudonymisation key
  autoscaled  true when an HPA or ScaledObject owns the replica count
  extraEnv, extraVolumes, extraMounts   YAML snippets (may be empty)
*/}}
{{- define "tollguard.deployment" -}}
{{- $root := .root -}}
{{- $comp := .comp -}}
{{- $sel := dict "root" $root "component" .component "carrier" .carrier -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "tollguard.componentLabels" $sel | nindent 4 }}
  {{- $ann := include "tollguard.annotations" $root }}
  {{- if or $ann .kedaScaled }}
  annotations:
    {{- with $ann }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- if .kedaScaled }}
    # The replica count belongs to the KEDA ScaledObject, which kube-score
    # does not know; its minReplicaCount is {{ .kedaScaled }}.
    kube-score/ignore: deployment-replicas
    {{- end }}
  {{- end }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ int $comp.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "tollguard.selectorLabels" $sel | nindent 6 }}
  {{- with $comp.updateStrategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "tollguard.componentLabels" $sel | nindent 8 }}
        {{- with $comp.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ .checksum }}
        {{- if $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $comp.httpPort | int | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $comp.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "tollguard.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $comp.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ int $comp.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with (include "tollguard.affinity" (dict "comp" $comp "sel" $sel)) }}
      affinity:
        {{- . | nindent 8 }}
      {{- end }}
      {{- with (include "tollguard.topologySpread" (dict "comp" $comp "sel" $sel)) }}
      topologySpreadConstraints:
        {{- . | nindent 8 }}
      {{- end }}
      {{- with $comp.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $comp.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "tollguard.image" (dict "root" $root "image" $comp.image) | quote }}
          imagePullPolicy: {{ include "tollguard.imagePullPolicy" (dict "root" $root "image" $comp.image) }}
          command: [{{ printf "/usr/local/bin/%s" .binary | quote }}]
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          ports:
            {{- if .grpcPort }}
            - name: grpc
              containerPort: {{ int .grpcPort }}
              protocol: TCP
            {{- end }}
            - name: http
              containerPort: {{ int $comp.httpPort }}
              protocol: TCP
          env:
            {{- include "tollguard.env" (dict "root" $root "comp" $comp "component" .component "configPath" "/etc/tollguard/config/config.toml") | nindent 12 }}
            {{- with .extraEnv }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- if or $comp.extraEnvFrom .envFrom }}
          envFrom:
            {{- with .envFrom }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $comp.extraEnvFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
          {{- include "tollguard.probes" (dict "comp" $comp "grpcPort" .grpcPort) | trim | nindent 10 }}
          resources:
            {{- toYaml $comp.resources | nindent 12 }}
          volumeMounts:
            {{- include "tollguard.volumeMounts" (dict "root" $root "key" .key) | nindent 12 }}
            {{- with .extraMounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "tollguard.volumes" (dict "root" $root "configMap" .configMap "key" .key) | nindent 8 }}
        {{- with .extraVolumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* A PodDisruptionBudget: (dict "root" $ "comp" … "component" … "carrier" … "name" …) */}}
{{- define "tollguard.pdb" -}}
{{- $sel := dict "root" .root "component" .component "carrier" .carrier -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "tollguard.componentLabels" $sel | nindent 4 }}
spec:
  {{- include "tollguard.pdbPolicy" .comp.podDisruptionBudget | nindent 2 }}
  selector:
    matchLabels:
      {{- include "tollguard.selectorLabels" $sel | nindent 6 }}
{{- end -}}

{{/* An autoscaling/v2 HPA: (dict "root" $ "comp" … "component" … "carrier" … "name" …) */}}
{{- define "tollguard.hpa" -}}
{{- $sel := dict "root" .root "component" .component "carrier" .carrier -}}
{{- $a := .comp.autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "tollguard.componentLabels" $sel | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  minReplicas: {{ int $a.minReplicas }}
  maxReplicas: {{ int $a.maxReplicas }}
  metrics:
    {{- include "tollguard.hpaMetrics" $a | nindent 4 }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
