{{/* Names, labels and the values every workload shares. */}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.fullname" -}}
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

{{/* <fullname>-<component>, kept within 63 characters. */}}
{{- define "rlhf.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "rlhf.fullname" $root | trunc (int (sub 62 (len $component)))) $component | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource, except the selector labels. */}}
{{- define "rlhf.commonLabels" -}}
helm.sh/chart: {{ include "rlhf.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- end -}}

{{/* Labels of resources that are not a workload's (workloads add their selector labels). */}}
{{- define "rlhf.labels" -}}
{{ include "rlhf.commonLabels" . }}
app.kubernetes.io/name: {{ include "rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one workload: (list root component [stage]). */}}
{{- define "rlhf.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "rlhf.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- if gt (len .) 2 }}
rlhf.io/stage: {{ index . 2 }}
{{- end }}
{{- end -}}

{{- define "rlhf.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- include "rlhf.componentName" (list . "keys") -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.checkpointClaim" -}}
{{- if .Values.checkpoints.existingClaim -}}
{{- .Values.checkpoints.existingClaim -}}
{{- else -}}
{{- include "rlhf.componentName" (list . "checkpoints") -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.kafkaBootstrap" -}}
{{- if .Values.devBroker.enabled -}}
{{- if .Values.externalKafka.bootstrapServers -}}
{{- fail "devBroker.enabled and externalKafka.bootstrapServers are both set: use your Kafka cluster or the development broker, not both" -}}
{{- end -}}
{{- printf "%s.%s.svc:%v" (include "rlhf.componentName" (list . "broker")) .Release.Namespace .Values.devBroker.port -}}
{{- else -}}
{{- required "externalKafka.bootstrapServers is required: host:port[,host:port] of your Kafka brokers (this chart does not install Kafka; devBroker.enabled runs a throwaway one for trials)" .Values.externalKafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* The image of a workload: (list root gpuCount). GPU workloads run the CUDA variant. */}}
{{- define "rlhf.image" -}}
{{- $root := index . 0 -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag -}}
{{- if gt (int (index . 1)) 0 -}}
{{- $tag = printf "%s%s" $tag $root.Values.image.cudaTagSuffix -}}
{{- end -}}
{{- printf "%s:%s" $root.Values.image.repository $tag -}}
{{- end -}}

{{/* host:port of a component's gRPC Service inside the cluster. */}}
{{- define "rlhf.grpcAddress" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $port := index $root.Values $component "ports" "grpc" -}}
{{- printf "%s.%s.svc:%v" (include "rlhf.componentName" (list $root $component)) $root.Release.Namespace $port -}}
{{- end -}}
