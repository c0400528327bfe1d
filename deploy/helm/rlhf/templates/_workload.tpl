{{/*
One workload of the platform: its env ConfigMap, Deployment, Service, HPA and PDB, from a dict:
  root        the chart context
  component   generation | feedback | reward | trainer | simulated-users
  stage       trainer stage (ppo | reward | sft), or ""
  name        resource name
  values      the workload's values
  args        container args (the image's entrypoint selects the service by the first one)
  env         settings the chart owns (values.env may not set them)
  secretEnv   [{name, key, optional, secret}]: variables read from the keys Secret (or `secret`)
  ports       [{name, port}]: container and Service ports
  grpcPort    port of the gRPC health service for the probes (0: no probes)
  checkpoints "ro", "rw" or "" (no checkpoint volume)
  volumes     extra [{volume, mount}]: a pod volume and its container mount (optional)
  serviceAccountName, automountToken, strategy ("" = RollingUpdate), autoscaled, replicas
The pod template alone ("rlhf.workload.podTemplate", also used by the distributed PPO trainer)
reads these optional keys too:
  containerName  container name (default: component)
  command        container command, replacing the image's entrypoint
  fieldEnv       [{name, fieldPath}]: variables from the downward API
  extraPorts     [{name, port}]: container ports the Service does not expose
  extraLabels    pod labels besides the selector labels
and "rlhf.workload.service" reads serviceSelector: labels narrowing the selector.
*/}}

{{- define "rlhf.workload.selector" -}}
{{- if .stage -}}
{{- include "rlhf.selectorLabels" (list .root .component .stage) -}}
{{- else -}}
{{- include "rlhf.selectorLabels" (list .root .component) -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.workload.env" -}}
{{- $where := .where -}}
{{- $user := .values.env | default dict -}}
{{- range $key, $_ := $user -}}
{{- if hasKey $.env $key -}}
{{- fail (printf "%s.env.%s is set by the chart from its own values (ports, addresses, models, stage, sft demonstrations); set those values instead" $where $key) -}}
{{- end -}}
{{- range $.secretEnv -}}
{{- if eq .name $key -}}
{{- fail (printf "%s.env.%s is a secret: put it in the keys Secret (secrets.*), not in plain values" $where $key) -}}
{{- end -}}
{{- end -}}
{{- if or (hasPrefix "RLHF_TLS_" $key) (hasPrefix "RLHF_KAFKA_SECURITY" $key) (hasPrefix "RLHF_KAFKA_SASL" $key) (hasPrefix "RLHF_KAFKA_SSL" $key) -}}
{{- fail (printf "%s.env.%s is set by the chart from tls.* and externalKafka.* (with TLS on, the probes use a plaintext health port)" $where $key) -}}
{{- end -}}
{{- if or (hasSuffix "_KEYS" $key) (hasSuffix "_KEY" $key) -}}
{{- fail (printf "%s.env.%s is a secret: put it in the keys Secret (secrets.*), not in plain values" $where $key) -}}
{{- end -}}
{{- end -}}
{{- $all := dict -}}
{{- range $key, $value := .env -}}
{{- $_ := set $all $key (toString $value) -}}
{{- end -}}
{{- range $key, $value := $user -}}
{{- $_ := set $all $key (toString $value) -}}
{{- end -}}
{{- toJson $all -}}
{{- end -}}

{{- define "rlhf.workload.configMap" -}}
{{- $env := include "rlhf.workload.env" . | fromJson -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .name }}-env
  labels:
    {{- include "rlhf.commonLabels" .root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
data:
  {{- range $key, $value := $env }}
  {{ $key }}: {{ $value | quote }}
  {{- end }}
{{- end -}}

{{/* A workload's pod template (metadata and spec), at column 0: nindent it under template:. */}}
{{- define "rlhf.workload.podTemplate" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $env := include "rlhf.workload.env" . | fromJson -}}
{{- $gpu := $v.gpu | default (dict "count" 0 "resource" "nvidia.com/gpu") -}}
{{- $resources := deepCopy ($v.resources | default dict) -}}
{{- if gt (int $gpu.count) 0 -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits $gpu.resource (int $gpu.count) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- /* With TLS, Kubernetes' gRPC probes ask the plaintext health port. */ -}}
{{- $probePort := .grpcPort -}}
{{- $extraPorts := .extraPorts | default list -}}
{{- if and .grpcPort $root.Values.tls.enabled -}}
{{- $probePort = $root.Values.tls.healthPort -}}
{{- $extraPorts = append $extraPorts (dict "name" "health" "port" $probePort) -}}
{{- end -}}
{{- if .grpcPort -}}
{{- $preStop := int ($v.preStopSleepSeconds | default 0) -}}
{{- if le (int $v.terminationGracePeriodSeconds) (add $preStop (int $v.shutdownGraceSeconds)) -}}
{{- fail (printf "%s: terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds (%v) + shutdownGraceSeconds (%v), or Kubernetes kills pods before they drain" .where $v.terminationGracePeriodSeconds $preStop $v.shutdownGraceSeconds) -}}
{{- end -}}
{{- end -}}
metadata:
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
    {{- with .extraLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    rlhf.io/config-sha256: {{ toJson $env | sha256sum }}
    {{- if not $root.Values.secrets.existingSecret }}
    rlhf.io/keys-sha256: {{ toJson $root.Values.secrets | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ .serviceAccountName }}
  automountServiceAccountToken: {{ .automountToken }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default 30 }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .containerName | default .component }}
      image: {{ include "rlhf.image" (list $root $gpu.count) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      args:
        {{- toYaml .args | nindent 8 }}
      {{- with concat (.ports | default list) $extraPorts }}
      ports:
        {{- range . }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
      {{- end }}
      envFrom:
        - configMapRef:
            name: {{ .name }}-env
      {{- if or .fieldEnv .secretEnv $v.extraEnv }}
      env:
        {{- range .fieldEnv }}
        - name: {{ .name }}
          valueFrom:
            fieldRef:
              fieldPath: {{ .fieldPath }}
        {{- end }}
        {{- range .secretEnv }}
        - name: {{ .name }}
          valueFrom:
            secretKeyRef:
              name: {{ .secret | default (include "rlhf.secretName" $root) }}
              key: {{ .key }}
              {{- if .optional }}
              optional: true
              {{- end }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- if .grpcPort }}
      {{- $probes := $v.probes }}
      startupProbe:
        grpc:
          port: {{ $probePort }}
        {{- toYaml $probes.startup | nindent 8 }}
      readinessProbe:
        grpc:
          port: {{ $probePort }}
        {{- toYaml $probes.readiness | nindent 8 }}
      livenessProbe:
        grpc:
          port: {{ $probePort }}
        {{- toYaml $probes.liveness | nindent 8 }}
      {{- end }}
      {{- if $v.preStopSleepSeconds }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ $v.preStopSleepSeconds }}"]
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/rlhf/.cache
        {{- if .checkpoints }}
        - name: checkpoints
          mountPath: {{ $root.Values.checkpoints.mountPath }}
          readOnly: {{ eq .checkpoints "ro" }}
        {{- end }}
        {{- range .volumes }}
        - {{ toYaml .mount | nindent 10 | trim }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.tmpSizeLimit }}
    - name: cache
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.cacheSizeLimit }}
    {{- if .checkpoints }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ include "rlhf.checkpointClaim" $root }}
    {{- end }}
    {{- range .volumes }}
    - {{ toYaml .volume | nindent 6 | trim }}
    {{- end }}
{{- end -}}

{{/* The Service of a workload's ports (named grpc, metrics, http). */}}
{{- define "rlhf.workload.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  labels:
    {{- include "rlhf.commonLabels" .root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
  {{- with (.values.service | default dict).annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ (.values.service | default dict).type | default "ClusterIP" }}
  selector:
    {{- include "rlhf.workload.selector" . | nindent 4 }}
    {{- with .serviceSelector }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
      {{- if eq .name "grpc" }}
      appProtocol: grpc
      {{- else }}
      appProtocol: http
      {{- end }}
    {{- end }}
{{- end -}}

{{- define "rlhf.workload" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{ include "rlhf.workload.configMap" . }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "rlhf.workload.selector" . | nindent 6 }}
  strategy:
    {{- if eq .strategy "Recreate" }}
    type: Recreate
    {{- else }}
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
    {{- end }}
  template:
    {{- include "rlhf.workload.podTemplate" . | nindent 4 }}
{{- if .ports }}
---
{{ include "rlhf.workload.service" . }}
{{- end }}
{{- if .autoscaled }}
{{- $hpa := $v.autoscaling }}
{{- if gt (int $hpa.minReplicas) (int $hpa.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is above maxReplicas (%v)" .where $hpa.minReplicas $hpa.maxReplicas) }}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  minReplicas: {{ $hpa.minReplicas }}
  maxReplicas: {{ $hpa.maxReplicas }}
  metrics:
    {{- if $hpa.metrics }}
    {{- toYaml $hpa.metrics | nindent 4 }}
    {{- else }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $hpa.targetCPUUtilizationPercentage }}
    {{- end }}
  {{- with $hpa.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- /* A PDB on a single replica would block node drains forever: only when there are two. */}}
{{- $floor := ternary (int ($v.autoscaling | default dict).minReplicas) (int .replicas) (.autoscaled | default false) }}
{{- if and ($v.pdb | default dict).enabled (ge $floor 2) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- include "rlhf.commonLabels" $root | nindent 4 }}
    {{- include "rlhf.workload.selector" . | nindent 4 }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rlhf.workload.selector" . | nindent 6 }}
{{- end }}
{{- end -}}
