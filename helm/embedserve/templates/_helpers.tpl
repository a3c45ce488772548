{{/* Names: "<release>-embedserve" unless overridden, cut to the 63 characters of a DNS label. */}}
{{- define "embedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedserve.fullname" -}}
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

{{- define "embedserve.tritonName" -}}
{{- printf "%s-triton" (include "embedserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource; selector labels add the component (gateway or triton). */}}
{{- define "embedserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "embedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "embedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "embedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "embedserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "embedserve.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Redis: the subchart's master, an external host, or none (empty). The password, when there is
one, comes from a Secret into REDIS_PASSWORD and is spliced in by Kubernetes' $(VAR) expansion. */}}
{{- define "embedserve.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis-master" .Release.Name -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{- define "embedserve.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- default (printf "%s-redis" .Release.Name) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- else if .Values.externalRedis.host -}}
{{- .Values.externalRedis.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "embedserve.redisPasswordKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.externalRedis.passwordSecret.key -}}
{{- end -}}
{{- end -}}

{{- define "embedserve.redisUrl" -}}
{{- $host := include "embedserve.redisHost" . -}}
{{- if $host -}}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.externalRedis.tls) -}}
{{- $port := ternary 6379 .Values.externalRedis.port .Values.redis.enabled -}}
{{- $db := ternary 0 .Values.externalRedis.db .Values.redis.enabled -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (ne (include "embedserve.redisPasswordSecret" .) "") -}}
{{- printf "%s://%s%s:%v/%v" $scheme $auth $host $port $db -}}
{{- end -}}
{{- end -}}

{{/* Milvus: the subchart's service, an external URI, or Milvus Lite on the gateway's /data volume. */}}
{{- define "embedserve.milvusUri" -}}
{{- if .Values.milvus.enabled -}}
{{- printf "http://%s-milvus:19530" .Release.Name -}}
{{- else if .Values.externalMilvus.uri -}}
{{- .Values.externalMilvus.uri -}}
{{- else -}}
/data/milvus.db
{{- end -}}
{{- end -}}

{{/* A settings value as an environment string: scalars as text, numbers without exponent, maps and lists as JSON. */}}
{{- define "embedserve.envValue" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* The model repository volume of a pod: the PVC, or an emptyDir the gateway's init container fills. */}}
{{- define "embedserve.modelVolume" -}}
- name: models
{{- if eq .Values.modelRepository.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelRepository.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelRepository.objectStore.sizeLimit }}
{{- end }}
{{- end -}}

{{/* A release CronJob's name: "<fullname>-<suffix>" within the 52 characters Kubernetes leaves a
CronJob (its Jobs add 11), the fullname cut rather than the suffix so the two names stay apart. */}}
{{- define "embedserve.releaseName" -}}
{{- $room := sub 51 (len .suffix) | int -}}
{{- printf "%s-%s" (include "embedserve.fullname" .root | trunc $room | trimSuffix "-") .suffix -}}
{{- end -}}

{{/* The gateway's Service as the release command reaches it from inside the cluster. */}}
{{- define "embedserve.gatewayUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "embedserve.fullname" .) .Release.Namespace .Values.service.port -}}
{{- end -}}

{{- define "embedserve.releaseImage" -}}
{{- printf "%s:%s" .Values.release.image.repository (default .Chart.AppVersion .Values.release.image.tag) -}}
{{- end -}}
